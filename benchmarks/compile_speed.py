"""Does ``bp.fit(..., compile=True)`` pay on a CPU? Per step, and end to end for short fits.

1. Per step (LeNet-300-100 and ResNet-20, random batches of 128 of the Fashion-MNIST shape): the
   median wall time of the whole step of ``bp.fit`` with its defaults, eager and compiled, against
   the deterministic step (the plain net, Adam, cross-entropy). The step is built by
   ``default_fit_step`` of ``benchmarks/svi_speed.py`` (``fit_step`` of ``bp.fit``: ELBO, Adam,
   the gates' natural step, the history, with the ``LossStep`` that ``bp.fit`` itself installs,
   ``compile=False`` or ``True``), without the exact tests of the gate switches (``gate_tests=None``:
   they run eagerly in both arms and, on random labels, at almost every step, where they would
   hide what compilation changes; the fits of 2. include them); the three are timed in turn step
   by step after a warm-up. The compile overhead is
   the wall time of the first compiled step (optimizer included) less a steady one, the
   compilation of the forward and of the backward (which runs at the first ``backward()``);
   ``LossStep.compile_seconds``, what ``FitResult`` reports, covers the same forward and backward
   (also recorded); the break-even is that overhead over the per-step gain.
2. End to end: ``bp.fit(bnet, loader, epochs=E, progress=False, compile=...)`` as a user runs it,
   timed around the call (compilation, and any recompilation, included): LeNet-300-100 on scikit-learn's digits (898 training images, the net of
   ``benchmarks/robustness.py``: 64 inputs) and on a 2,000-image Fashion-MNIST subset
   (``load_fashion_mnist(subset=2000)``), one epoch, eager and compiled alternated for
   ``--rounds`` rounds; and a longer fit (``--long-epochs`` epochs of the 2,000 subset, seeds 0
   and 1) with the test accuracy of the posterior predictive (32 draws) and the share of hidden
   nodes with PIP < 0.5.

Every measurement runs in a process of its own with a fresh, empty inductor cache
(``TORCHINDUCTOR_CACHE_DIR`` set to a new temporary folder): the compile times are cold, as on a
user's first fit (a later process on the same cache reuses what it holds). The processes of the two
arms alternate, so that load from other processes affects both alike::

    python benchmarks/compile_speed.py --threads 1     # CPU, about 5 minutes
    python benchmarks/compile_speed.py --device cuda --no-fits --json OUT.json   # GPU steps

Writes ``benchmarks/results/compile_speed.json`` (atomically; ``--json PATH`` elsewhere), each
row with its command, device, torch version and threads; the table of
``benchmarks/README.md#compiled-step`` is generated from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "compile_speed.json"
N_DATA = 60000  # num_data of the per-step measurement (the Fashion-MNIST training set)
MARK = "RESULT "


# -- measurements, each in a child process ---------------------------------------------------------


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def child_step(model: str, steps: int, warmup: int, batch: int, device: str = "cpu") -> dict:
    """Median ms per step of the deterministic step and of ``bp.fit``'s step, eager and compiled."""
    import torch
    import torch.nn.functional as F
    from svi_speed import default_fit_step

    from bayesprune.inference import make_adam
    from bayesprune.models import get_model

    torch.manual_seed(0)
    k = 4
    xs = [torch.randn(batch, 1, 28, 28, device=device) for _ in range(k)]
    ys = [torch.randint(0, 10, (batch,), device=device) for _ in range(k)]
    net = get_model(model).to(device)
    det_opt = make_adam(net.parameters(), 1e-3)

    def det(i: int) -> None:
        det_opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(xs[i % k]), ys[i % k]).backward()
        det_opt.step()

    def fit_arm(compile: bool):
        total = 10 * (warmup + steps + 2)
        # without the exact tests of the gate switches: they run eagerly in both arms, and on a
        # fresh net with random labels they propose at almost every step and dominate the step
        # (ResNet-20: about 10x the deterministic step with them); the fits below include them
        step, _, optimizers = default_fit_step(
            model, device, N_DATA, total, compile=compile, gate_tests=False
        )
        return (lambda i: step(xs[i % k], ys[i % k])), optimizers.loss_step

    eager, _ = fit_arm(False)
    compiled, loss_step = fit_arm(True)
    arms = {"deterministic": det, "eager": eager, "compiled": compiled}
    times: dict[str, list[float]] = {a: [] for a in arms}
    for i in range(warmup + steps):
        for name, step in arms.items():
            t0 = time.perf_counter()
            step(i)
            if device != "cpu":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    ms = {a: 1000 * statistics.median(t[warmup:]) for a, t in times.items()}
    gain = ms["eager"] - ms["compiled"]
    # the first compiled step less a steady one: compilation of the forward and of the backward
    # (compiled lazily, at the first backward)
    overhead = times["compiled"][0] - ms["compiled"] / 1000
    return {
        "model": model,
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "det_ms": ms["deterministic"],
        "eager_ms": ms["eager"],
        "compiled_ms": ms["compiled"],
        "eager_ratio": ms["eager"] / ms["deterministic"],
        "compiled_ratio": ms["compiled"] / ms["deterministic"],
        "compiled_vs_eager": ms["compiled"] / ms["eager"],
        "gate_tests": False,  # the step without them (above)
        "compiled": loss_step.compiled,
        "fallback": loss_step.fallback,
        "compile_s": loss_step.compile_seconds,
        "first_step_s": times["compiled"][0],
        "first_steps_ms": [1000 * t for t in times["compiled"][:3]],
        "overhead_s": overhead,
        "break_even_steps": 1000 * overhead / gain if gain > 0 else None,
        "graphs": _graphs(),
    }


def child_fit(data: str, epochs: int, compile: bool, seed: int) -> dict:
    """``bp.fit`` end to end (timed around the call), then the predictive's test accuracy and
    the share of hidden nodes with PIP < 0.5."""
    import torch

    import bayesprune as bp
    from bayesprune.data import load_digits, load_fashion_mnist, loader
    from bayesprune.models import lenet_300_100

    if data == "digits":
        splits, d_in = load_digits(flatten=False), 64
    else:
        splits, d_in = load_fashion_mnist(subset=2000), 784
    train = loader(splits.train, 128, seed=seed)
    test = loader(splits.test, 512, shuffle=False)
    torch.manual_seed(seed)
    bnet = bp.bayesianize(lenet_300_100(in_features=d_in))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        fit = bp.fit(bnet, train, epochs=epochs, progress=False, seed=seed, compile=compile)
        wall = time.perf_counter() - t0
    accuracy = bp.evaluate(bnet, test, num_samples=32)
    pips = bnet.inclusion_probs()
    hidden = [pips[k] for k in pips if k in fit.nodes_off]
    allp = torch.cat(hidden) if hidden else torch.zeros(0)
    return {
        "data": data,
        "train_images": len(splits.train),
        "test_images": len(splits.test),
        "epochs": epochs,
        "steps": len(fit.loss),
        "seed": seed,
        "compile": compile,
        "compiled": fit.compiled,
        "fit_s": wall,
        "fit_seconds": fit.seconds,
        "compile_s": fit.compile_seconds,
        "graphs": _graphs(),
        "accuracy": accuracy,
        "hidden_off": float((allp < 0.5).float().mean()),
        "fit_warnings": [
            str(w.message)[:200] for w in caught if issubclass(w.category, UserWarning)
        ],
    }


# -- the parent: one process per measurement, each with a cold inductor cache ----------------------


def _spawn(kind: str, spec: dict, threads: int) -> dict:
    cache = tempfile.mkdtemp(prefix="inductor_cold_")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    cmd = [sys.executable, __file__, "--threads", str(threads), "--child", kind, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode or not lines:
        raise SystemExit(f"{kind} {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len(MARK) :])
    out["load_before"] = spec.get("load_before")
    return out


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--models", nargs="+", default=["lenet_300_100", "resnet20"])
    parser.add_argument("--steps", type=int, nargs=2, default=[200, 12], metavar=("MLP", "CONV"))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the short fits")
    parser.add_argument("--long-epochs", type=int, default=10)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the per-step rows")
    parser.add_argument("--no-fits", action="store_true", help="the per-step rows only")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        spec = json.loads(args.child[1])
        spec.pop("load_before", None)
        out = (child_step if args.child[0] == "step" else child_fit)(**spec)
        print(MARK + json.dumps(out), flush=True)
        return out

    import torch

    command = "python benchmarks/compile_speed.py " + " ".join(sys.argv[1:])
    where = f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    if args.device != "cpu":
        where = torch.cuda.get_device_name(0)
    prov = {
        "command": command,
        "device": where,
        "torch": torch.__version__,
        "threads": args.threads,
    }
    t_start = time.perf_counter()

    steps = []
    for model in args.models:
        mlp = "lenet" in model and "5" not in model
        n = args.steps[0] if mlp else args.steps[1]
        spec = dict(model=model, steps=n, warmup=10 if mlp else 3, batch=128, device=args.device)
        row = _spawn("step", dict(spec, load_before=os.getloadavg()[0]), args.threads)
        steps.append(dict(row, **prov))
        print(
            f"{model}: det {row['det_ms']:.2f} ms, eager {row['eager_ms']:.2f} ms, compiled "
            f"{row['compiled_ms']:.2f} ms, first step {row['first_step_s']:.1f} s, compile_seconds "
            f"{row['compile_s']:.1f} s", flush=True
        )  # fmt: skip

    runs = []
    cases = [("digits", 1, [0] * args.rounds), ("fmnist-2000", 1, [0] * args.rounds)]
    cases.append(("fmnist-2000", args.long_epochs, [0, 1]))
    if args.no_fits:
        cases = []
    for data, epochs, seeds in cases:
        for seed in seeds:
            for compile in (False, True):
                spec = dict(data=data, epochs=epochs, compile=compile, seed=seed)
                row = _spawn("fit", dict(spec, load_before=os.getloadavg()[0]), args.threads)
                runs.append(dict(row, **prov))
                print(
                    f"{data} {epochs} epoch(s) seed {seed} compile={compile}: {row['fit_s']:.2f} s"
                    f" (compile {row['compile_s']:.1f} s), acc {row['accuracy']:.4f}, hidden off"
                    f" {row['hidden_off']:.0%}", flush=True,
                )  # fmt: skip

    fits = []
    for data, epochs, seeds in cases:
        mine = [r for r in runs if r["data"] == data and r["epochs"] == epochs]
        eager = [r for r in mine if not r["compile"]]
        comp = [r for r in mine if r["compile"]]
        fits.append(
            {
                "data": data,
                "train_images": mine[0]["train_images"],
                "epochs": epochs,
                "steps": mine[0]["steps"],
                "runs": len(eager),
                "seeds": sorted(set(seeds)),
                "eager_s": _median(eager, "fit_s"),
                "compiled_s": _median(comp, "fit_s"),
                "ratio": _median(comp, "fit_s") / _median(eager, "fit_s"),
                "compile_s": _median(comp, "compile_s"),
                "all_compiled": all(r["compiled"] for r in comp),
                "graphs": max(r["graphs"] for r in comp),
                "accuracy_eager": [r["accuracy"] for r in eager],
                "accuracy_compiled": [r["accuracy"] for r in comp],
                "hidden_off_eager": [r["hidden_off"] for r in eager],
                "hidden_off_compiled": [r["hidden_off"] for r in comp],
                **prov,
            }
        )
    meta = dict(
        prov,
        cache="cold: each measurement in its own process with a fresh, empty "
        "TORCHINDUCTOR_CACHE_DIR",
        seconds=round(time.perf_counter() - t_start, 1),
    )
    payload = {"meta": meta, "steps": steps, "fits": fits, "runs": runs}
    from results_io import write_json

    write_json(args.json, payload)
    print(f"wrote {args.json} ({meta['seconds']} s)")
    return payload


if __name__ == "__main__":
    main()
