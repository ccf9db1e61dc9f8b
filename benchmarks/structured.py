"""Accuracy against parameters kept: our structured nets against every structured baseline.

Issue "Posteriors that prune well out of the box", the structured compression target: at every
parameter budget from 5% to 50%, our certified or median-probability structured nets are at least
as accurate as every structured baseline of ``bayesprune.baselines`` on LeNet-300-100,
LeNet-5-Caffe and ResNet-20 (Fashion-MNIST), one accuracy-versus-parameters plot per net.

Per net, one dense net trained by this script (``bp.train``, 20 epochs), then, with no fine-tuning
of any pruned net (as target (b) of the robustness matrix):

* ``magnitude (structured)``, ``SNACS``: scores of the dense net, pruned at every level of
  ``LEVELS`` (the fraction of the prunable nodes removed, global ranking);
* ``self-compression (SNR)``: a Gaussian BNN fitted from the dense net (``SVI_EPOCHS``, rounds of
  30% as in ``compare.py``), pruned at every level by SNR;
* ``Gumbel node masks``: node masks trained with the weights (``SVI_EPOCHS`` epochs, target
  density 0.1), pruned at every level by mask logit;
* ours, ``bp.fit`` with its defaults (``bp.priors.default_prior()``) from the dense net
  (``SVI_EPOCHS`` epochs): the
  median-probability net (PIP >= 0.5) and the net Learn then Test certifies (alpha 0.02,
  delta 0.1, accuracy drop against the posterior predictive, 5,000 calibration images), and
  the nodes ranked by inclusion log-odds at every keep fraction of ``pip_candidates(by="keep")``;
  then the median-probability nets of fits with per-node priors, ``SpikeAndSlab(level="node")``
  with the prior inclusions ``GAMMAS`` and, below what a
  double holds, the prior log-odds ``LOG_ODDS`` (the prior's answer to "how small": the only
  setting changed), and of per-parameter priors priced in proportion to the training set,
  ``PER_EXAMPLE`` (``SpikeAndSlab(prior_log_odds=0, price_per_example=lam)``: a node costs
  ``lam`` nats per parameter per training example, the same trade of mean training loss
  against parameters on every data size);
* ours, the elimination path of the same default fit (``bp.elimination_scores`` on the training
  data, then ``bp.prune(keep=f, scores=...)`` at the fractions of ``KEEP`` below the median
  model's), and the net Learn then Test certifies among the median model and these (accuracy
  drop against the dense net, as ``certify``).

The check (printed, and in the table): for every baseline net with 5% to 50% of the parameters,
the most accurate of our median-probability and certified nets with at most as many parameters,
and the gap.

    python benchmarks/structured.py --threads 2 --models lenet_300_100 lenet5_caffe
    python benchmarks/structured.py --plot          # the PNGs of docs/structured.md from the JSON

Rows go to ``benchmarks/results/structured.json``: a method a run measures replaces all its saved
rows of that net; the other saved rows (``--ours-only`` keeps the baselines') stay.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import warnings
from pathlib import Path

import torch
from results_io import merge_rows, write_json

import bayesprune as bp
from bayesprune.baselines import SNACS, GumbelPruning, MagnitudePruning, SelfCompression
from bayesprune.candidates import pip_candidates
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.models import get_model

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "structured.json"
PLOTS = HERE.parent / "docs" / "structured"
BATCH = 128
#: training images per net (ResNet-20 on a CPU: the size of robustness cell 9)
TRAIN_SIZE = {"lenet_300_100": 50000, "lenet5_caffe": 10000, "resnet20": 2000}
DENSE_EPOCHS = 20
SVI_EPOCHS = 20
LEVELS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98]
KEEP = [0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.075, 0.05, 0.03, 0.02]
#: prior inclusions of the extra fits: the prior's answer to "how small" (with point weights a node
#: stays only if it lowers the training NLL by more than about log(1 / gamma) nats)
GAMMAS = [0.3, 0.03, 0.01, 1e-5, 1e-10, 1e-20, 1e-30, 1e-50, 1e-80, 1e-150, 1e-300]
#: stronger priors, as log-odds log(gamma / (1 - gamma)) (1e-300 is -690.8): nats per node
LOG_ODDS = [-1000.0, -1500.0, -2000.0]
#: per-parameter priors, lam * N nats per parameter of a node's group (N training images): the
#: penalty lam * (parameters kept) on the *mean* training loss of L0 regularisation (Louizos,
#: Welling and Kingma 2018), in the ELBO's scale. Not on the certified prior path (a family
#: of its own: its order against the per-node priors differs from layer to layer)
PER_EXAMPLE = [2e-5, 4e-5, 6e-5]
#: bp.elimination_scores options other than its defaults (ResNet-20: a test is a deep pass)
ELIMINATION = {"resnet20": {"examples": 256, "fraction": 0.2}}
ALPHA, DELTA = 0.02, 0.1
BUDGET = (0.05, 0.50)


def _row(model: str, method: str, level, net, dense, test, **extra) -> dict:
    return {
        "model": model,
        "method": method,
        "level": level,
        "acc": round(bp.evaluate(net.eval(), test), 4),
        "params": round(bp.count_params(net) / bp.count_params(dense), 4),
        **extra,
    }


def _curve(model, method, pm, dense, test) -> list[dict]:
    rows = []
    for level in LEVELS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = pm.prune(level)
        rows.append(_row(model, method, level, net, dense, test))
    return rows


def run_model(
    model: str, seed: int, baselines: bool = True, defaults_only: bool = False
) -> list[dict]:
    splits = load_fashion_mnist(subset=TRAIN_SIZE[model], val_size=2000, cal_size=5000)
    train = loader(splits.train, BATCH, seed=seed)
    test = loader(splits.test, 512, shuffle=False)
    cal = loader(splits.cal, 512, shuffle=False)
    x = next(iter(test))[0][:2]
    torch.manual_seed(seed)
    dense = get_model(model)
    bp.train(dense, train, epochs=DENSE_EPOCHS, progress=False, seed=seed)
    rows = [_row(model, "dense", None, dense, dense, test, seconds=None)]
    print(rows[-1], flush=True)

    def timed(method, make):
        t0 = time.perf_counter()
        pm = make().fit(copy.deepcopy(dense), train)
        seconds = round(time.perf_counter() - t0, 1)
        for r in _curve(model, method, pm, dense, test):
            rows.append({**r, "seconds": seconds})
            print(rows[-1], flush=True)

    if baselines:
        timed("magnitude (structured)", lambda: MagnitudePruning(structured=True))
        timed("SNACS", lambda: SNACS(per_class=200, progress=False, seed=seed))
        timed("self-compression (SNR)", lambda: SelfCompression(
            "snr", epochs=SVI_EPOCHS, rounds=3, round_fraction=0.3, round_epochs=2,
            progress=False, seed=seed))  # fmt: skip
        timed("Gumbel node masks", lambda: GumbelPruning(
            0.1, granularity="node", epochs=SVI_EPOCHS, progress=False, seed=seed))  # fmt: skip

    settings = [{}] if defaults_only else [{}, *({"prior_inclusion": g} for g in GAMMAS),
                *({"prior_log_odds": a} for a in LOG_ODDS),
                *({"prior_log_odds": 0.0, "price_per_example": lam} for lam in PER_EXAMPLE)]  # fmt: skip
    path = []  # (prior log-odds, label, median-probability net) of every prior
    for kw in settings:
        lam = kw.get("price_per_example")
        # {}: the default prior (its log-odds on the first layer place it on the prior path)
        prior = bp.priors.SpikeAndSlab(level="node", **kw) if kw else bp.priors.default_prior()
        bnet = bp.bayesianize(copy.deepcopy(dense), prior)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bp.fit(bnet, train, epochs=SVI_EPOCHS, progress=False, seed=seed)
            seconds = round(time.perf_counter() - t0, 1)
            small = bp.prune(bnet, threshold=0.5, example_input=x)
        label = _label(kw) if lam is None else f"ours, {lam:g} N nats per parameter"
        rows.append(_row(model, f"{label}: PIP >= 0.5", 0.5, small, dense, test, seconds=seconds))
        print(rows[-1], flush=True)
        if lam is not None:
            continue
        first = next(iter(bnet.bayesian_layers.values()))
        path.append((first.prior.log_odds(first), label, small))  # (the prior bound to N)
        if kw:
            continue
        cert = bp.conformal.certify(
            bnet, cal, alpha=ALPHA, delta=DELTA, example_input=x, progress=False
        )
        if cert.index is not None:
            rows.append(_row(model, f"{label}: certified (α={ALPHA}, δ={DELTA})", cert.level,
                             cert.model, dense, test, seconds=seconds))  # fmt: skip
            print(rows[-1], flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            levels, nets = pip_candidates(bnet, KEEP, by="keep", example_input=x)
        for level, net in zip(levels, nets, strict=True):
            rows.append(_row(model, f"{label}: top nodes by log-odds", level, net, dense, test,
                             seconds=seconds))  # fmt: skip
            print(rows[-1], flush=True)
        rows += _elimination(model, label, bnet, small, dense, train, cal, test, x)
    if not defaults_only:  # (the path needs every prior's net)
        rows += _certify_path(model, path, dense, cal, test)
    return rows


def _certify_path(model, path, dense, cal, test) -> list[dict]:
    """Learn then Test over the median-probability nets of the priors, ordered by the prior's
    log-odds from weakest to strongest (an order fixed before the calibration data is seen):
    the most pruned net whose accuracy drop against the dense net is certified."""
    path = sorted(path, key=lambda p: -p[0])
    cert = bp.conformal.certify_candidates(
        [net for _, _, net in path], dense, cal, alpha=ALPHA, delta=DELTA,
        levels=[label.removeprefix("ours, ") for _, label, _ in path], level_name="prior",
        dense=dense, progress=False,
    )  # fmt: skip
    if cert.index is None:
        print(f"{model}: no net of the prior path certified", flush=True)
        return []
    row = _row(model, f"ours, prior path: certified (α={ALPHA}, δ={DELTA})", cert.level,
               cert.model, dense, test, seconds=None)  # fmt: skip
    print(row, flush=True)
    return [row]


def _label(kw: dict) -> str:
    if "prior_inclusion" in kw:
        return f"ours, prior inclusion {kw['prior_inclusion']:g}"
    if "prior_log_odds" in kw:
        return f"ours, prior log-odds {kw['prior_log_odds']:g}"
    return "ours, defaults"


def _elimination(model, label, bnet, median, dense, train, cal, test, x) -> list[dict]:
    """The nets of bp.elimination_scores (greedy backward elimination on the posterior-mean net,
    training data) at the keep fractions of KEEP below the median model's, and the one Learn then
    Test certifies among them (the median model first, then from least to most pruned)."""
    t0 = time.perf_counter()
    scores = bp.elimination_scores(bnet, train, **ELIMINATION.get(model, {}))
    seconds = round(time.perf_counter() - t0, 1)
    pips = list(bnet.inclusion_probs().values())
    median_share = sum(int((p >= 0.5).sum()) for p in pips) / sum(p.numel() for p in pips)
    levels = [f for f in KEEP if f < median_share]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nets = [bp.prune(bnet, keep=f, scores=scores, example_input=x) for f in levels]
    rows = []
    for level, net in zip(levels, nets, strict=True):
        rows.append(_row(model, f"{label}: elimination path", level, net, dense, test,
                         seconds=seconds))  # fmt: skip
        print(rows[-1], flush=True)
    reference = bnet.dense_module().eval()
    cert = bp.conformal.certify_candidates(
        [median, *nets], reference, cal, alpha=ALPHA, delta=DELTA, levels=[0.5, *levels],
        level_name="keep", dense=reference, progress=False,
    )  # fmt: skip
    if cert.index is not None:
        rows.append(_row(model, f"{label}: elimination path, certified (α={ALPHA}, δ={DELTA})",
                         cert.level, cert.model, dense, test, seconds=seconds))  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def check(rows: list[dict]) -> list[dict]:
    """For every baseline net within the budget range: the best of ours (median-probability or
    certified) with at most its parameters, and the gap in points."""
    ours = [
        r
        for r in rows
        if r["method"].startswith("ours")
        and "top nodes" not in r["method"]
        and not r["method"].endswith("elimination path")
    ]
    out = []
    for r in rows:
        if r["method"] == "dense" or r["method"].startswith("ours"):
            continue
        if not BUDGET[0] <= r["params"] <= BUDGET[1]:
            continue
        fits = [o for o in ours if o["model"] == r["model"] and o["params"] <= r["params"]]
        best = max(fits, key=lambda o: o["acc"], default=None)
        out.append({
            "model": r["model"], "baseline": r["method"], "params": r["params"], "acc": r["acc"],
            "ours": None if best is None else best["acc"],
            "ours_params": None if best is None else best["params"],
            "gap": None if best is None else round(100 * (best["acc"] - r["acc"]), 2),
        })  # fmt: skip
    return out


def _series(method: str) -> str:
    """The median-probability nets of every prior are one line of the plot."""
    if method == "ours, defaults: PIP >= 0.5" or (
        method.startswith(("ours, prior inclusion", "ours, prior log-odds"))
        and method.endswith("PIP >= 0.5")
    ):
        return "ours: median-probability nets, the default prior (0.1) and stronger ones"
    if method.endswith("N nats per parameter: PIP >= 0.5"):
        lo, hi = min(PER_EXAMPLE), max(PER_EXAMPLE)
        return f"ours: median-probability nets, lam N nats per parameter (lam {lo:g} to {hi:g})"
    return method


def plot(payload: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    paths = []
    rows = payload["rows"]
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        dense = next(r for r in mine if r["method"] == "dense")
        ax.axhline(dense["acc"], color="k", lw=0.8, ls=":", label=f"dense {dense['acc']:.4f}")
        ax.axvspan(*BUDGET, color="0.93", zorder=0)
        series: dict[str, list[tuple[float, float]]] = {}
        for r in mine:
            if r["method"] != "dense":
                series.setdefault(_series(r["method"]), []).append((r["params"], r["acc"]))
        for method, pts in series.items():
            pts = sorted(pts)
            single = len(pts) == 1
            ax.plot(*zip(*pts, strict=True), "o" if single else ".-", label=method,
                    ms=7 if single else 4)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("parameters kept (share of dense)")
        ax.set_ylabel("test accuracy (no fine-tuning)")
        ax.set_ylim(max(0.0, dense["acc"] - 0.35), dense["acc"] + 0.02)
        ax.set_title(f"{model}, Fashion-MNIST, {TRAIN_SIZE.get(model, '?')} training images")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = PLOTS / f"{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _save_rows(model: str, rows: list[dict], fresh: tuple[str, ...]) -> None:
    """Write ``model``'s ``rows`` into ``RESULTS``: they replace every saved row of their methods
    (no stale levels stay) and every saved row of the methods starting with ``fresh`` (the
    dense net and ours, all of which a run measures: a saved one it did not give again, such as
    a certificate no net passed this time, is from an earlier run). The other rows stay."""
    payload = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    ran = {r["method"] for r in rows}
    kept = [
        r
        for r in payload.get("rows", [])
        if r["model"] != model or not (r["method"] in ran or r["method"].startswith(fresh))
    ]
    write_json(RESULTS, {**payload, "rows": kept + rows})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["lenet_300_100", "lenet5_caffe"],
                   choices=sorted(TRAIN_SIZE))  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", action="store_true", help="only draw the plots from the JSON")
    p.add_argument("--ours-only", action="store_true",
                   help="skip the baselines (their saved rows stay; the check reads them)")  # fmt: skip
    p.add_argument("--defaults-only", action="store_true",
                   help="with --ours-only: only the default fit and the rows it gives (the "
                        "other priors' saved rows and the prior path's stay)")  # fmt: skip
    args = p.parse_args(argv)
    if args.defaults_only and not args.ours_only:
        p.error("--defaults-only is an option of --ours-only")
    if args.plot:
        for path in plot(json.loads(RESULTS.read_text())):
            print(path)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/structured.py " + " ".join(argv or __import__("sys").argv[1:])
    device = f"cpu ({platform.machine()}), {torch.get_num_threads()} thread(s)"
    for model in args.models:
        rows = run_model(
            model, args.seed, baselines=not args.ours_only, defaults_only=args.defaults_only
        )
        for r in rows:
            r.update(command=command.strip(), device=device, seed=args.seed)
        fresh = ("dense", "ours, defaults") if args.defaults_only else ("dense", "ours")
        _save_rows(model, rows, fresh)
        saved = json.loads(RESULTS.read_text())["rows"]  # with the baselines' saved rows
        checks = check([r for r in saved if r["model"] == model])
        merge_rows(RESULTS, checks, key=lambda c: c["model"], field="checks")  # this net's
        for c in checks:
            print(c, flush=True)


if __name__ == "__main__":
    main()
