"""Results as data: the tables of ``benchmarks/README.md``, rendered from ``benchmarks/results/``.

Each table of the README sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``
and is generated from the JSON files under ``benchmarks/results/`` by the renderer ``NAME``
below; nothing between the markers is written by hand. The renderers only format the numbers
the JSON holds (no arithmetic beyond comparing the two robustness seeds and taking the range of a
list of per-seed accuracies). The JSON is what the scripts write with ``--json`` (robustness.py
and gate_step.py always); a file or row with a ``source`` field was transcribed from the old
results page, and its renderer says so under the table.

    python benchmarks/tables.py --write               # regenerate every table of the README
    python benchmarks/tables.py --write robustness    # one table
    python benchmarks/tables.py --check               # exit 1 when a table is stale
    python benchmarks/tables.py --print baselines     # print one table

Standard library only, so that it runs in a second anywhere.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from table_speed import (
    composite_origin,
    origin,
    render_compile_speed,
    render_fit_cost,
    render_gpu,
    render_svi_speed,
)
from table_structured import render_structured

HERE = Path(__file__).parent
RESULTS = HERE / "results"
README = HERE / "README.md"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _pct(v, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _acc(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def _x(v) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _pts(v) -> str:
    return "–" if v is None else f"{v:+.2f}"


# -- the default fit ------------------------------------------------------------------------------


def _robustness_cells(name: str = "CELLS") -> dict:
    """``CELLS`` (or another literal, ``name``) of ``robustness.py`` (read from its source:
    importing it would import torch)."""
    tree = ast.parse((HERE / "robustness.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"benchmarks/robustness.py defines no {name}")


def robustness_table(payload: dict, cells: dict[int, tuple]) -> list[str]:
    """The markdown table of robustness.py's JSON (every cell; cells not run yet say so)."""
    done = {r["cell"]: r for r in payload["cells"]}
    mark = {True: "yes", False: "**no**", None: "-"}
    lines = [
        "| cell | data (train images) | net | start | steps | prior | dense | predictive | "
        "pruned (PIP >= 0.5) | params kept | hidden off | PIPs in [0.1, 0.9] | (a) | (b) | (c) |",
        "|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for cell, (data, n, net, start, budget, epochs, prior) in cells.items():
        r = done.get(cell)
        if r is None:
            lines.append(
                f"| {cell} | {data} ({n}) | {net} | {start} | {budget}, {epochs} ep | {prior} | "
                "not run yet |  |  |  |  |  |  |  |  |"
            )
            continue
        lines.append(
            f"| {cell} | {data} ({r['train_images']}) | {net} | {start} | {budget}, {r['steps']} | "
            f"{prior} | {r['dense']:.4f} | {r['predictive']:.4f} | {r['pruned']:.4f} | "
            f"{r['params']:.1%} | {r['hidden_off']:.0%} | {r['uncertain']:.0%} | "
            f"{mark[r['a']]} | {mark[r['b']]} | {mark[r['c']]} |"
        )
    return lines


def _lenet_full(r: dict) -> str:
    """A row of ``bayes_lenet.py``'s JSON in words (accuracies, hidden nodes switched off)."""
    return (
        f"dense {r['dense_acc']:.4f}, predictive {r['bayes_acc']:.4f}, median-probability model "
        f"{r['median_model_acc']:.4f}, hidden nodes with PIP < 0.5 {r['hidden_below_half']:.0%}"
    )


def render_robustness() -> list[str]:
    payload = load("robustness.json")
    lines = robustness_table(payload, _robustness_cells())
    notes = [origin(payload, "robustness.json")]
    seed0 = {r["cell"]: r for r in payload["cells"]}
    other = load("robustness_seed1.json")
    both = [(seed0[r["cell"]], r) for r in other["cells"] if r["cell"] in seed0]
    if both:
        same = sum(all(a[k] == b[k] for k in "abc") for a, b in both)
        d_pred = max(abs(a["predictive"] - b["predictive"]) for a, b in both)
        d_params = max(abs(a["params"] - b["params"]) for a, b in both)
        cells = ", ".join(str(b["cell"]) for _, b in both)
        notes.append(
            f"*Seed 1 (`results/robustness_seed1.json`, `{other['meta']['command']}`, cells "
            f"{cells}): the same targets met and missed as seed 0 in {same} of {len(both)} cells; "
            f"predictive within {100 * d_pred:.1f} points, params kept within "
            f"{100 * d_params:.1f} points.*"
        )
    notes.append(
        "*The default prior against the per-node charge alone (the default before it) and the "
        "other candidates, on the spike-and-slab cells of this table and on held-out cells: "
        "[`docs/default-candidates.md`](../docs/default-candidates.md).*"
    )
    same = [r for r in payload["cells"] if "dense_same_budget" in r]
    if same:
        parts = ", ".join(
            f"cell {r['cell']}: {r['dense_same_budget']:.4f} against the fit's {r['predictive']:.4f}"
            for r in same
        )
        notes.append(
            "*Short fits from random weights, with a dense net trained from the same start for the "
            f"fit's own epochs (column `dense_same_budget`): {parts}. Target (a) is still taken "
            "against the dense column.*"
        )
    why = _robustness_cells("MISSED")
    missed = [r["cell"] for r in payload["cells"] if False in (r["a"], r["b"], r["c"])]
    unexplained = [c for c in missed if c not in why]
    if unexplained:
        raise RuntimeError(
            f"robustness cells {unexplained} miss a target and MISSED in robustness.py does not "
            "say why: add the measured reason"
        )
    notes.append(
        "*Why targets are missed: "
        + "; ".join(f"cell {c}: {why[c]}" for c in sorted(missed))
        + ".*"
    )
    full = load("bayes_lenet_defaults.json")
    for r in full["rows"]:
        per = ", ".join(f"{v:.0%}" for v in r["per_layer_below_half"].values())
        notes.append(
            f"*LeNet-300-100 on all 50,000 training images (`results/bayes_lenet_defaults.json`, "
            f"`{full['command']}`): {_lenet_full(r)} ({per} per layer).*"
        )
    return [*lines, "", " ".join(notes)]


def render_gate_step() -> list[str]:
    payload = load("gate_step.json")
    cases: dict[tuple, dict] = {}
    for r in payload["rows"]:
        cases.setdefault((r["data"], r["epochs"], r["steps"], r["dense"]), {})[r["rule"]] = r
    lines = [
        "| data | SVI steps | dense | fixed 0.01: predictive / pruned | params | PIPs in "
        "[0.1, 0.9] | tied: step | predictive / pruned | params | PIPs in [0.1, 0.9] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (data, _, steps, dense), rules in cases.items():
        cells = []
        for rule in ("fixed", "tied"):
            r = rules.get(rule)
            if r is None:
                cells.append("– | – | – |" if rule == "fixed" else "– | – | – | – |")
                continue
            step = f" {r['gate_step']:g} |" if rule == "tied" else ""
            cells.append(
                f"{step} {r['predictive']:.4f} / {r['pruned']:.4f} | {r['params']:.1%} | "
                f"{r['uncertain']:.0%} |"
            )
        lines.append(f"| {data} | {steps} | {dense:.4f} |" + "".join(cells))
    lines += ["", origin(payload, "gate_step.json")]
    return lines


def render_gate_probes() -> list[str]:
    """The probes of ``benchmarks/gate_probes.py`` (a table of ``docs/notes/gate-decisions.md``)."""
    payload = load("gate_probes.json")
    cells = _robustness_cells()
    mark = {True: "yes", False: "no", None: "-"}
    lines = [
        "| probe | cell | net, data, start, steps | prior | dense | predictive | pruned (test / "
        "train) | dense on train: acc, NLL | params kept | hidden off | PIPs in [0.1, 0.9] | (a) (b) (c) | NLL + KL at "
        "start -> end | gates changing sign: never / once / more; per quarter |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(payload["meta"]["probes"])}
    rows = sorted(
        payload["rows"], key=lambda r: (order.get(r["probe"], 99), r["value"] or 0, r["cell"])
    )
    for r in rows:
        data, _, net, start, _, _, prior = cells[r["cell"]]
        probe = r["probe"] if r["value"] is None else f"{r['probe']} {r['value']:g}"
        elbo = (
            f"{r['nll_start']:.0f} + {r['kl_start']:.0f} -> {r['nll_end']:.0f} + {r['kl_end']:.0f}"
            if r.get("nll_start") is not None
            else "-"
        )
        dense_train = (
            f"{r['dense_train']:.4f}, {r['dense_train_nll']:.0f}" if "dense_train" in r else "-"
        )
        g = r.get("gate_sign_changes")
        flips = (
            f"{g['never']} / {g['once']} / {g['twice_or_more']}; "
            + " ".join(str(v) for v in g["per_quarter"])
            if g
            else "-"
        )
        lines.append(
            f"| {probe} | {r['cell']} | {net}, {data} ({r['train_images']}), {start}, "
            f"{r['steps']} | {prior} | {r['dense']:.4f} | {r['predictive']:.4f} | "
            f"{r['pruned']:.4f} / {r['pruned_train']:.4f} | {dense_train} | {r['params']:.1%} | "
            f"{r['hidden_off']:.0%} | {r['uncertain']:.0%} | "
            f"{mark[r['a']]} {mark[r['b']]} {mark[r['c']]} | {elbo} | {flips} |"
        )
    return [*lines, "", origin(payload, "gate_probes.json")]


# -- cost -----------------------------------------------------------------------------------------


# -- pruning against the baselines ---------------------------------------------------------------


LABELS = {
    "dense": "dense",
    "magnitude": "magnitude (Alvarez, unstructured)",
    "magnitude_structured": "magnitude (structured)",
    "snacs": "SNACS",
    "mint": "MINT",
    "gumbel": "Gumbel masks (weights)",
    "self_compression": "self-compression (SNR)",
    "spike_slab": "spike-and-slab (ours)",
    "group_horseshoe": "group horseshoe (ours)",
}


def render_baselines() -> list[str]:
    payload = load("baselines.json")
    lines = [
        "| model | method | settings | test acc | params kept | FLOPs kept | certified acc "
        "(α=0.02, δ=0.1) | certified params |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    dense = []
    for res in payload["results"]:
        r = res["row"]
        if r["method"] == "dense":
            dense.append(f"{r['model']} {_acc(r['acc'])} ({res['settings']})")
            continue
        kind = "" if r.get("structured", True) else " (non-zeros)"
        lines.append(
            f"| {r['model']} | {LABELS.get(r['method'], r['method'])} | {res['settings']} | "
            f"{_acc(r['acc'])} | {_pct(r['params'])}{kind} | {_pct(r['flops'])} | "
            f"{_acc(r.get('cert_acc'))} | {_pct(r.get('cert_params'))} |"
        )
    provenance = composite_origin(payload, payload["results"], "baselines.json")
    lines += ["", f"*Dense nets: {', '.join(dense)}. {provenance}*"]
    return lines


def render_conformal() -> list[str]:
    payload = load("conformal.json")
    m = payload["meta"]
    lines = [
        "| procedure | α | test file: risk or coverage | 100 random splits: violations or "
        "coverage | params kept or mean set size | test acc |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in payload["certificates"]:
        what = "nothing certified" if c["level"] is None else f"PIP >= {c['level']:.6g}"
        lines.append(
            f"| Learn then Test, {what} | {c['alpha']:g} | risk {c['test_risk']:.4f} | "
            f"{c['violations']} violations | {_pct(c['params_kept'])} | {_acc(c['test_acc'])} |"
        )
    for s in payload["sets"]:
        lines.append(
            f"| prediction sets, {s['score']} | {m['set_alpha']:g} | coverage "
            f"{s['coverage']:.4f} | coverage {s['split_cov']:.4f} ± {s['split_sd']:.4f} | "
            f"{s['size']:.3f} | – |"
        )
    lines.append("")
    lines.append(
        f"*δ = {m['delta']:g}, risk: {m['risk']}; dense {m['dense_acc']:.4f}, unpruned "
        f"posterior-mean net {m['mean_acc']:.4f}, predictive {m['predictive_acc']:.4f}; splits "
        f"of the {m['pool']:,}-image held-out pool with n_cal = {m['n_cal']:,}. "
        + origin(payload, "conformal.json").strip("*")
        + "*"
    )
    return lines


# -- structured compression -----------------------------------------------------------------------

_DEFAULT_CLAUSES = re.compile(
    r", (PIP >= 0\.5|min_nodes 1|sd family per_weight|reparam=local|posterior saved in / loaded "
    r"from [^,;]*)"
)


def short_settings(settings: str) -> str:
    """compression.py's settings without the clauses every row shares (defaults, machine)."""
    return _DEFAULT_CLAUSES.sub("", settings.split(";")[0])


def render_compression() -> list[str]:
    payload = load("compression.json")
    lines = [
        "| model | method | settings | test acc | Δ (points) | params kept | FLOPs kept | "
        "FLOP reduction | speed-up b1 | b256 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["rows"]:
        if r["method"] == "dense":
            continue
        lines.append(
            f"| {r['model']} | {r.get('label', r['method'])} | {short_settings(r.get('settings', ''))} | "
            f"{_acc(r['test_acc'])} | {_pts(r.get('delta_points'))} | "
            f"{_pct(r.get('params_kept'))} | {_pct(r.get('flops_kept'))} | "
            f"{_x(r.get('flop_reduction'))} | {_x(r.get('speedup_b1'))} | "
            f"{_x(r.get('speedup_b256'))} |"
        )
    provenance = composite_origin(payload, payload["rows"], "compression.json")
    lines += ["", f"*{provenance}*"]
    return lines


def render_frontier() -> list[str]:
    payload = load("frontier.json")
    m = payload["meta"]
    second = sorted({r["h2"] for r in payload["rows"]})
    by_inputs: dict[int, dict[int, str]] = {}
    for r in payload["rows"]:
        accs = r.get("accs") or []
        lo, hi = r.get("min", min(accs, default=None)), r.get("max", max(accs, default=None))
        by_inputs.setdefault(r["inputs"], {})[r["h2"]] = (
            f"{r['inputs']}-{r['h1']}-{r['h2']}-10: {r['mean']:.4f} ({lo:.4f}-{hi:.4f}), "
            f"{_pts(r.get('delta_points'))}"
        )
    lines = [
        "| inputs | "
        + " | ".join(f"second layer {h}: widths: mean (min-max), Δ" for h in second)
        + " |",
        "|---:|" + "---|" * len(second),
    ]
    for k, cells in by_inputs.items():
        lines.append(f"| {k} | " + " | ".join(cells.get(h, "–") for h in second) + " |")
    dense = ", ".join(f"{a:.4f}" for a in m["dense_accs"])
    lines.append("")
    lines.append(
        f"*Mean test accuracy over seeds {', '.join(map(str, m['seeds']))}, {m['epochs']} "
        f"epochs, budget {m['budget']:,} parameters; Δ against the dense LeNet-300-100 of the same "
        f"run ({dense}; mean {m['dense_mean']:.4f}). "
        + origin(payload, "frontier.json").strip("*")
        + "*"
    )
    return lines


def render_distributed() -> list[str]:
    """Seconds per epoch of ``fit(devices=N)`` on CPU processes (gloo) and GPUs (NCCL, from
    ``distributed_gpu.json`` once ``gpu_check.sh`` has run), and the memory of certify/predict."""
    cpu = load("distributed.json")
    gpu_path = RESULTS / "distributed_gpu.json"
    gpu = json.loads(gpu_path.read_text()) if gpu_path.exists() else None
    by: dict[tuple[str, int], dict] = {}
    for r in sorted(cpu["rows"], key=lambda r: -r["epoch_s"]):
        by[("cpu", r["devices"])] = r  # the fastest setting of each process count
    single = [r for r in cpu["rows"] if r is not by[("cpu", r["devices"])]]
    by |= {("gpu", r["devices"]): r for r in (gpu or {}).get("rows", [])}
    counts = sorted({d for _, d in by})

    def cell(kind: str, d: int) -> str:
        r, one = by.get((kind, d)), by.get((kind, 1))
        if r is None:
            return "– | –"
        ratio = f" ({r['epoch_s'] / one['epoch_s']:.2f}x)" if one and d > 1 else ""
        return f"{r['epoch_s']:.2f}{ratio} | {r['startup_s']:.1f}"

    lines = [
        "| processes | CPU, gloo: s / epoch (vs 1) | start s | CPU threads / process | "
        "GPU, NCCL: s / epoch (vs 1) | start s | hidden nodes kept (CPU) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in counts:
        row = by.get(("cpu", d), {})
        kept, threads = row.get("hidden_nodes_kept", "–"), row.get("threads_per_process", "–")
        lines.append(f"| {d} | {cell('cpu', d)} | {threads} | {cell('gpu', d)} | {kept} |")
    m = cpu["meta"]
    notes = [
        f"*LeNet-300-100, {m['train_images']:,} Fashion-MNIST images, batch "
        f"{cpu['rows'][0]['batch_size']} (the global batch); the CPU processes share "
        f"{m['device']}. " + origin(cpu, "distributed.json").strip("*") + "*"
    ]
    for r in single:
        notes[-1] = notes[-1][:-1] + (
            f" {r['devices']} process with {r['threads_per_process']} threads: "
            f"{r['epoch_s']:.2f} s / epoch (the 2 cores are shared with other jobs).*"
        )
    if gpu is None:
        notes.append("*GPU rows unmeasured: `bash benchmarks/gpu_check.sh`.*")
    else:
        notes.append("*" + origin(gpu, "distributed_gpu.json").strip("*") + "*")
    mem = {r["operation"]: r for r in cpu.get("memory", [])}
    if mem:
        words = {
            "certify": "`certify` streaming its loader (batches of 1,000)",
            "predict_batched": "`bnet.predict` (32 draws) in batches of 1,000",
            "predict_whole": "`bnet.predict` given all of them as one tensor",
        }
        first = next(iter(mem.values()))
        notes.append(
            f"*Peak resident memory over {first['images']:,} images ({first['data_mb']:.0f} MB of "
            "inputs, already loaded): "
            + "; ".join(
                f"{words[k]} +{r['peak_increase_mb']:.0f} MB ({r['seconds']:.1f} s)"
                for k, r in mem.items()
            )
            + (f" (`{cpu['meta']['memory_command']}`)" if "memory_command" in cpu["meta"] else "")
            + ".*"
        )
    return [*lines, "", " ".join(notes)]


def render_transformers() -> list[str]:
    """Heads and feed-forward units pruned: ours (predictive, pruned, fine-tuned) against
    magnitude pruning at equal size, with sizes, FLOPs and latency (``transformers.py``)."""
    payload = load("transformers.json")
    lines = [
        "| task | our nodes | dense | ours: predictive | pruned | pruned + FT | "
        "magnitude: pruned | pruned + FT | heads kept | FFN units kept | params | "
        "FLOPs / example | latency (ms) | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    words = {"threshold 0.5": "PIP ≥ 0.5", "half": "top half by PIP"}
    notes = {}
    for r in payload["rows"]:
        if "size_prior" in r:
            opts = ", ".join(f"{k}={v}" for k, v in r["size_prior"].items())
            words["prior"] = f"PIP ≥ 0.5 of a fit with a prior for size: SpikeAndSlab({opts})"

        def arrow(key: str, fmt: str = "{:,}", r: dict = r) -> str:
            return f"{fmt.format(r[key + '_dense'])} → {fmt.format(r[key + '_pruned'])}"

        lines.append(
            f"| {r['task']} | {words.get(r.get('variant'), r.get('variant', '–'))} | "
            f"{_acc(r['dense'])} | {_acc(r['predictive'])} | "
            f"{_acc(r['pruned'])} | {_acc(r['pruned_finetuned'])} | "
            f"{_acc(r['magnitude_pruned'])} | {_acc(r['magnitude_finetuned'])} | "
            f"{r['heads_kept']} / {r['heads_total']} | {r['units_kept']} / {r['units_total']} | "
            f"{arrow('params')} | {arrow('flops')} | {arrow('latency_ms', '{:.2f}')} | "
            f"{'met' if r['target'] else 'missed'} |"
        )
        m = r.get("meta", {})
        notes[r["task"]] = (
            f"{r['task']}: {r['train']:,} training examples, {r['epochs']} epochs dense and "
            f"{r['epochs']} of `bp.fit`, {r['finetune_epochs']} of `bp.finetune` for every pruned "
            f"network, {r['test']:,} test examples; measured by `{m.get('command', '?').strip()}` on "
            f"{m.get('device', '?')}, torch {m.get('torch', '?')}."
        )
    checks = [
        f"{r['task']}: {_acc(r['pruned_finetuned_long'])} after {r['epochs']} epochs of "
        f"fine-tuning instead of {r['finetune_epochs']}; the same shape from random weights, "
        f"{r['scratch_epochs']} epochs: {_acc(r['scratch_same_shape'])}"
        for r in payload["rows"]
        if "scratch_same_shape" in r
    ]
    if checks:
        checks = ["*The top-half-by-PIP shape, longer: " + "; ".join(checks) + ".*"]
    lines += ["", "*From `results/transformers.json`. " + " ".join(notes.values()) + "*", *checks]
    return lines


def _setting(rows: list[dict], default: bool) -> str:
    """The prior of a robustness JSON's spike-and-slab cells, in words (``default``: the file of
    robustness.py's default prior)."""
    lam = rows[0].get("price_per_example") if rows else None
    if default:
        price = "" if lam is None else f", `SpikeAndSlab(price_per_example={lam:g})`"
        return f"default: `bp.priors.default_prior()`{price}"
    if lam is None:
        return 'per-node charge alone: `SpikeAndSlab(level="node")` (prior inclusion 0.1)'
    if rows[0].get("prior_inclusion", 0.5) == 0.5:  # rows without it had inclusion 1/2
        return f"`SpikeAndSlab(prior_log_odds=0, price_per_example={lam:g})`"
    if rows[0].get("price_rule") == "min":
        return f"`SpikeAndSlab(price_per_example={lam:g})`"
    # the option's first rule (git history: robustness_lam5e-06_sum.json), since replaced
    return f"log-odds logit(0.1) - {lam:g} N m (the charges added; an earlier rule of the option)"


def render_default_candidates() -> list[str]:
    """The default prior against candidate defaults, on the matrix's spike-and-slab cells and on
    the held-out cells that no default was chosen on (``HELDOUT`` of robustness.py)."""
    cells = {**_robustness_cells(), **_robustness_cells("HELDOUT")}
    files = {  # part: (the default's file, the other priors' files)
        "matrix": ("robustness", "robustness_lam*.json"),
        "held-out": ("robustness_heldout", "robustness_heldout_lam*.json"),
        "seed-1 matrix": ("robustness_seed1", "robustness_seed1_lam*.json"),
    }
    summary = []
    lines = [
        "| cell | data (train images) | net | start | budget, steps | prior | dense | predictive "
        "| pruned | params kept | hidden off | (a) | (b) | (c) |",
        "|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    mark = {True: "yes", False: "**no**", None: "-"}
    by_setting: dict[str, dict[str, list]] = {}
    default_lam = None
    for part, (default, pattern) in files.items():
        paths = [RESULTS / f"{default}{end}.json" for end in ("", "_pernode")]
        for path in [p for p in paths if p.exists()] + sorted(RESULTS.glob(pattern)):
            payload = json.loads(path.read_text())
            rows = [r for r in payload["cells"] if r["prior"] == "ss"]
            if not rows:
                continue
            name = _setting(rows, default=path == paths[0])
            if path == paths[0]:
                default_lam = rows[0].get("price_per_example")
            elif (rows[0].get("prior_inclusion"), rows[0].get("price_per_example")) == (
                0.1,
                default_lam,
            ):
                name += ", the default's prior run as a candidate"
            entry = by_setting.setdefault(name, {})
            entry.setdefault(part, []).extend(rows)
            entry.setdefault("files", []).append(
                f"`results/{path.name}` (`{payload['meta']['command']}`)"
            )
    rows_out = []
    for name, entry in by_setting.items():
        for part in ("matrix", "held-out"):  # the seed-1 rows are counted, not listed
            for r in entry.get(part, []):
                rows_out.append((r["cell"], name, r))
        counts = []
        for part in files:
            rows = entry.get(part, [])
            if rows:
                met = [r["cell"] for r in rows if False not in (r["a"], r["b"], r["c"])]
                worst = min(r["predictive"] - r["dense"] for r in rows)
                kept = statistics.median(r["params"] for r in rows)
                counts.append(
                    f"{len(met)} of {len(rows)} {part} cells (predictive - dense at worst "
                    f"{100 * worst:+.2f} points, median params kept {kept:.0%})"
                )
        summary.append(f"- {name}: every target that applies met in {', '.join(counts)}; "
                       f"from {', '.join(entry['files'])}.")  # fmt: skip
    for cell, name, r in sorted(rows_out, key=lambda t: (t[0], not t[1].startswith("default"))):
        data, _, net, start, budget, *_ = cells[cell]
        lines.append(
            f"| {cell} | {data} ({r['train_images']}) | {net} | {start} | {budget}, {r['steps']} "
            f"| {name} | {r['dense']:.4f} | {r['predictive']:.4f} | {r['pruned']:.4f} | "
            f"{r['params']:.1%} | {r['hidden_off']:.0%} | {mark[r['a']]} | {mark[r['b']]} | "
            f"{mark[r['c']]} |"
        )
    for path in [
        RESULTS / "bayes_lenet_defaults.json",
        RESULTS / "bayes_lenet_pernode.json",
        *sorted(RESULTS.glob("bayes_lenet_price*.json")),
    ]:
        full = json.loads(path.read_text())
        for r in full["rows"]:
            summary.append(
                f"- LeNet-300-100 on all 50,000 training images, 60 epochs (`results/{path.name}`, "
                f"`{full['command']}`): {_lenet_full(r)}."
            )
    return [*summary, "", *lines]


RENDERERS: dict[str, Callable[[], list[str]]] = {
    "robustness": render_robustness,
    "default-candidates": render_default_candidates,
    "gate-step": render_gate_step,
    "svi-speed": render_svi_speed,
    "fit-cost": render_fit_cost,
    "compile-speed": render_compile_speed,
    "baselines": render_baselines,
    "conformal": render_conformal,
    "compression": render_compression,
    "frontier": render_frontier,
    "distributed": render_distributed,
    "gate-probes": render_gate_probes,
    "transformers": render_transformers,
    "structured": render_structured,
    "gpu": render_gpu,
}
#: tables that live on a page of their own instead of the README
PAGES: dict[str, Path] = {
    "gate-probes": HERE.parent / "docs" / "notes" / "gate-decisions.md",
    "gate-step": HERE.parent / "docs" / "notes" / "gate-decisions.md",
    "transformers": HERE.parent / "docs" / "transformers.md",
    "compile-speed": HERE.parent / "docs" / "compiled-step.md",
    "fit-cost": HERE.parent / "docs" / "fit-cost.md",
    "default-candidates": HERE.parent / "docs" / "default-candidates.md",
    "structured": HERE.parent / "docs" / "structured.md",
    "gpu": HERE.parent / "docs" / "gpu.md",
}


def render(name: str) -> str:
    return "\n".join(RENDERERS[name]())


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- table:{name} -->", f"<!-- /table:{name} -->"


def rewrite(text: str, names: list[str]) -> str:
    """``text`` with the tables ``names`` regenerated between their markers."""
    for name in names:
        begin, end = _markers(name)
        if text.count(begin) != 1 or text.count(end) != 1:
            raise SystemExit(f"need exactly one {begin} ... {end} on the page of table {name}")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{render(name)}\n{end}{tail}"
    return text


def names_in(text: str) -> list[str]:
    """The table names whose markers ``text`` holds, in order."""
    return re.findall(r"<!-- table:([\w-]+) -->", text)


def write(names: list[str] | None = None, readme: Path = README) -> None:
    """Regenerate ``names`` (default: every table) in ``readme``, atomically."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from results_io import write_text

    for page in {readme, *PAGES.values()}:
        mine = [n for n in (names or list(RENDERERS)) if PAGES.get(n, readme) == page]
        if mine:
            write_text(page, rewrite(page.read_text(), mine))


def stale(readme: Path = README) -> list[str]:
    """The tables of ``readme`` that differ from their JSON, and the renderers it lacks."""
    out = []
    for page in {readme, *PAGES.values()}:
        text = page.read_text()
        present = names_in(text)
        expected = [n for n in RENDERERS if PAGES.get(n, readme) == page]
        out += [f"{n} (no markers in {page.name})" for n in expected if n not in present]
        out += [f"{n} (no renderer)" for n in present if n not in RENDERERS]
        for name in (n for n in present if n in RENDERERS):
            if rewrite(text, [name]) != text:
                out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", nargs="*", metavar="NAME", help="regenerate these tables (all)")
    g.add_argument("--check", action="store_true", help="exit 1 when the README is stale")
    g.add_argument("--print", metavar="NAME", choices=list(RENDERERS), help="print one table")
    args = p.parse_args(argv)
    if args.print:
        print(render(args.print))
        return 0
    if args.check:
        bad = stale()
        if bad:
            print(
                f"{README} is stale: {', '.join(bad)}; run python benchmarks/tables.py --write",
                file=sys.stderr,
            )
            return 1
        print(f"{README}: every table matches benchmarks/results/")
        return 0
    unknown = [n for n in args.write if n not in RENDERERS]
    if unknown:
        p.error(f"unknown tables {unknown}; the tables are {', '.join(RENDERERS)}")
    write(args.write or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
