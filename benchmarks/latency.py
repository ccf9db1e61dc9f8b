"""Where a pruned network's CPU time goes, and what folding BatchNorm into the convolutions changes.

``benchmarks/compression.py`` saves each run's dense net (``<run>/dense-<model>.safetensors``) and
its pruned nets (``<run>/<model>-<method>.safetensors``). This script loads them and, in one
process, times each pair back to back (``bp.compression_report``: median of repeated runs after
warm-up, dense and pruned alternating, ``--threads`` CPU threads):

* ``as saved``: eval mode, BatchNorm as a separate operation;
* ``BatchNorm folded``: ``bp.fold_batchnorm`` applied to *both* nets (for nets with BatchNorm), the
  usual last step before deployment;
* ``BatchNorm folded, channels_last``: the same, with both nets' weights (and so their
  activations) in torch's ``channels_last`` memory format, which oneDNN's CPU convolutions
  prefer;
* ``dense vs dense``: the dense net timed against a copy of itself, the timing noise of this run.

Speed-up is dense latency over pruned latency; the FLOP reduction (a count, unchanged by folding)
is printed next to it, with their ratio (issue 4's latency goal: at least 0.6). Then
:mod:`torch.profiler` splits each net's time at ``--profile-batch`` by operator kind (self CPU
time of the aten operators: convolution, batch norm, add, ReLU, pooling, linear, other), and
forward hooks time every Conv / Linear layer of the saved nets (ms and GMAC/s per layer), which
says what the FLOP count does not see: how efficiently each layer runs at its width. Everything
is also written to ``benchmarks/results/latency/<run name>-<model>.json`` (atomically; ``--out``
chooses another path).

    python benchmarks/compression.py ... --out runs/compression_r20_e6_b02    # writes the nets
    python benchmarks/latency.py --run runs/compression_r20_e6_b02 --model resnet20 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from time import perf_counter

import torch
from results_io import RESULTS_DIR, write_json
from safetensors.torch import load_file
from torch.profiler import ProfilerActivity, profile

import bayesprune as bp
from bayesprune.metrics import flops_by_layer
from bayesprune.models import get_model
from bayesprune.pruning import compression_report, load_pruned

LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
KINDS = ("convolution", "batch norm", "add", "relu", "pooling", "linear", "other")


def _kind(op: str) -> str:
    """Operator kind of an aten op name (self times, so nested calls are not counted twice)."""
    name = op.removeprefix("aten::")
    if "conv" in name:
        return "convolution"
    if "batch_norm" in name:
        return "batch norm"
    if name in ("add", "add_"):
        return "add"
    if "relu" in name or "clamp" in name:  # an in-place ReLU runs as clamp_min
        return "relu"
    if "pool" in name:
        return "pooling"
    if name in ("linear", "addmm", "mm", "matmul"):
        return "linear"
    return "other"


def profile_kinds(net: torch.nn.Module, x: torch.Tensor, passes: int = 10) -> dict[str, float]:
    """Milliseconds per forward pass by operator kind, and ``"total"``."""
    net.eval()
    with torch.inference_mode():
        for _ in range(3):  # warm-up (oneDNN primitive creation)
            net(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                net(x)
    ms: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith("aten::"):
            ms[_kind(evt.key)] += evt.self_cpu_time_total / 1e3 / passes
    ms["total"] = sum(ms[k] for k in KINDS)
    return {k: ms[k] for k in (*KINDS, "total")}


def layer_times(net: torch.nn.Module, x: torch.Tensor, passes: int = 10) -> list[dict]:
    """Per Conv / Linear layer: its shape, MACs per example, median ms per pass and GMAC/s.

    Timed with forward hooks around each layer (CPU execution is synchronous), so the numbers say
    how efficiently each layer's kernel runs at its width, which a FLOP count assumes constant.
    """
    macs = flops_by_layer(net, x[:1])
    starts: dict[str, float] = {}
    times: dict[str, list[float]] = defaultdict(list)
    handles = []
    for name, m in net.named_modules():
        if name in macs and isinstance(m, LAYERS):
            handles.append(
                m.register_forward_pre_hook(
                    lambda _m, _a, n=name: starts.__setitem__(n, perf_counter())
                )
            )
            handles.append(
                m.register_forward_hook(
                    lambda _m, _a, _o, n=name: times[n].append(perf_counter() - starts[n])
                )
            )
    net.eval()
    try:
        with torch.inference_mode():
            for _ in range(3):
                net(x)
            times.clear()
            for _ in range(passes):
                net(x)
    finally:
        for h in handles:
            h.remove()
    modules = dict(net.named_modules())
    rows = []
    for name, ts in times.items():
        m = modules[name]
        out_w, in_w = (
            (m.out_features, m.in_features)
            if isinstance(m, torch.nn.Linear)
            else (m.out_channels, m.in_channels)
        )
        ms = 1e3 * statistics.median(ts)
        rows.append(
            {
                "layer": name,
                "in": in_w,
                "out": out_w,
                "macs": macs[name],
                "ms": ms,
                "gmacs": macs[name] * x.shape[0] / (ms * 1e6),
            }
        )
    return rows


def _has_batchnorm(net: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def _timing(name: str, dense, small, x, args) -> dict:
    rep = compression_report(
        dense, small, x, batch_sizes=args.batch_sizes, repeats=args.repeats, rounds=args.rounds
    )
    return {
        "variant": name,
        "latency_ms": {bs: [1e3 * d, 1e3 * s] for bs, (d, s) in rep.latency.items()},
        "speedup": rep.speedup,
        "flop_reduction": rep.flop_reduction,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", type=Path, required=True, help="a benchmarks/compression.py --out")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--methods", nargs="+", default=["spike_slab"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile-batch", type=int, default=256)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON (default benchmarks/results/latency/<run name>-<model>.json)",
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dense_path = args.run / f"dense-{args.model}.safetensors"
    if not dense_path.exists():
        raise SystemExit(
            f"{dense_path} does not exist: run benchmarks/compression.py --out {args.run}"
        )
    dense = get_model(args.model)
    dense.load_state_dict(load_file(str(dense_path)))
    dense.eval()
    x = torch.zeros(1, 1, 28, 28)  # Fashion-MNIST input; timing repeats it to each batch size
    xp = x.expand(args.profile_batch, 1, 28, 28).contiguous()
    folds = _has_batchnorm(dense)
    dense_f = bp.fold_batchnorm(dense, example_input=x) if folds else None

    results = {"model": args.model, "threads": args.threads, "methods": {}}
    results["noise"] = _timing("dense vs dense", dense, copy.deepcopy(dense), x, args)
    results["profile"] = {"dense, as saved": profile_kinds(dense, xp)}
    results["layers"] = {"dense": layer_times(dense, xp)}
    if folds:
        results["profile"]["dense, BatchNorm folded"] = profile_kinds(dense_f, xp)
    for method in args.methods:
        path = args.run / f"{args.model}-{method}.safetensors"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: no {method} net in this run")
        small = load_pruned(path, lambda: get_model(args.model)).eval()
        rows = [_timing("as saved", dense, small, x, args)]
        results["profile"][f"{method}, as saved"] = profile_kinds(small, xp)
        results["layers"][method] = layer_times(small, xp)
        if folds:
            small_f = bp.fold_batchnorm(small, example_input=x)
            rows.append(_timing("BatchNorm folded", dense_f, small_f, x, args))
            results["profile"][f"{method}, BatchNorm folded"] = profile_kinds(small_f, xp)
            cl = torch.channels_last
            rows.append(
                _timing(
                    "BatchNorm folded, channels_last",
                    copy.deepcopy(dense_f).to(memory_format=cl),
                    copy.deepcopy(small_f).to(memory_format=cl),
                    x,
                    args,
                )
            )
        results["methods"][method] = rows
    results["provenance"] = (
        f"python benchmarks/latency.py {' '.join(sys.argv[1:] if argv is None else argv)} "
        f"(CPU: {platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"torch {torch.__version__})"
    )
    out = args.out or RESULTS_DIR / "latency" / f"{args.run.name}-{args.model}.json"
    write_json(out, results)
    print_tables(results, args.batch_sizes)
    return results


def print_tables(results: dict, batch_sizes: list[int]) -> None:
    head = " | ".join(f"dense ms b{b} | pruned ms b{b} | speed-up b{b}" for b in batch_sizes)
    print(f"\n| model | method | variant | {head} | FLOP reduction | speed-up / FLOP reduction |")
    print("|---|---|---|" + "---:|" * (3 * len(batch_sizes) + 2))
    rows = [("dense", results["noise"])] + [
        (m, r) for m, rs in results["methods"].items() for r in rs
    ]
    for method, r in rows:
        cells = " | ".join(
            f"{r['latency_ms'][b][0]:.2f} | {r['latency_ms'][b][1]:.2f} | {r['speedup'][b]:.2f}x"
            for b in batch_sizes
        )
        ratio = ", ".join(f"{r['speedup'][b] / r['flop_reduction']:.2f}" for b in batch_sizes)
        print(
            f"| {results['model']} | {method} | {r['variant']} | {cells} | "
            f"{r['flop_reduction']:.2f}x | {ratio} |"
        )
    print("\nms per forward pass by operator kind (torch.profiler, self CPU time, one batch):\n")
    print("| net | " + " | ".join(KINDS) + " | total |")
    print("|---|" + "---:|" * (len(KINDS) + 1))
    for net, ms in results["profile"].items():
        total = ms["total"]
        cells = " | ".join(f"{ms[k]:.2f} ({100 * ms[k] / total:.0f}%)" for k in KINDS)
        print(f"| {net} | {cells} | {total:.2f} |")
    nets = list(results["layers"])
    print(
        "\nPer layer, as saved (forward hooks, one batch of the profile size): "
        + ", ".join(f"{n}: in->out channels, MACs per example, ms, GMAC/s" for n in nets)
        + "\n"
    )
    print(
        "| layer | "
        + " | ".join(f"{n} shape | {n} MACs | {n} ms | {n} GMAC/s" for n in nets)
        + " |"
    )
    print("|---|" + "---:|" * (4 * len(nets)))
    by_net = [{r["layer"]: r for r in results["layers"][n]} for n in nets]
    for layer in by_net[0]:
        cells = []
        for rows in by_net:
            r = rows.get(layer)
            cells.append(
                "– | – | – | –"
                if r is None
                else f"{r['in']}->{r['out']} | {r['macs']:,} | {r['ms']:.2f} | {r['gmacs']:.1f}"
            )
        print(f"| {layer} | " + " | ".join(cells) + " |")
    print(f"\nProduced by: {results['provenance']}")


if __name__ == "__main__":
    main()
