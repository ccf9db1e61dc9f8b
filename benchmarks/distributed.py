"""Data-parallel SVI: wall time per epoch of ``bp.fit`` on 1 and 2 processes, and the peak memory
of ``certify`` / ``predict`` on a 50,000-image calibration set.

Times LeNet-300-100 (node spike-and-slab, the default fit) on a Fashion-MNIST subset with
``devices=1`` (one process, ``--threads`` threads), ``devices=N`` (N processes, gloo on the CPU,
``--threads // N`` threads each, at least 1) and one process on one thread; or with
``--device cuda``, one process per GPU (NCCL). The per-epoch time is the fit's own
(``FitResult.seconds / epochs``, process 0); starting the processes is reported apart
(``startup_s``). Then, in fresh subprocesses (the peak resident memory, ``VmHWM`` reset after
loading the data, is the operation's own): ``certify`` of the fitted model with 50,000
Fashion-MNIST images as calibration loader (batches of 1,000), and ``bnet.predict`` on the same
images in batches of 1,000 and as one tensor.

    python benchmarks/distributed.py --threads 2 --devices 1 2
    python benchmarks/distributed.py --device cuda --devices 1 2 --json OUT.json   # on GPUs
    python benchmarks/distributed.py --memory-only   # the memory rows again, the times kept

``--memory-only`` fits the model once (its time not recorded), re-measures the memory rows and keeps
the file's timing rows and their command; the memory rows' own command is ``memory_command``.

Writes ``benchmarks/results/distributed.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_io import RESULTS_DIR, write_json

import bayesprune as bp
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.models import lenet_300_100

CAL = 50_000
BATCH = 1_000


def _status_mb(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from ``/proc/self/status``, in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the peak resident memory (``VmHWM``) to the current one: Linux ``clear_refs`` 5.
    Loading the 60,000 images peaks above what the operations take, and ``getrusage``'s peak
    cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fit_row(devices: int, args, train, model_path: Path | None, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    bnet = bp.bayesianize(lenet_300_100())
    data = loader(train, args.batch_size, seed=args.seed)
    t0 = time.perf_counter()
    result = bp.fit(bnet, data, epochs=args.epochs, seed=args.seed, progress=False,
                    device=args.device, devices=devices)  # fmt: skip
    wall = time.perf_counter() - t0
    if model_path is not None:
        bnet.cpu().save(model_path)
    pips = bnet.inclusion_probs()
    hidden = list(pips)[:-1]  # the output layer keeps its units
    kept = sum(int((pips[k] >= 0.5).sum()) for k in hidden)
    row = {
        "devices": devices,
        "device": args.device,
        "threads_per_process": max(1, threads // devices) if args.device == "cpu" else None,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "steps_per_epoch": len(data),
        "epoch_s": result.seconds / args.epochs,
        "startup_s": wall - result.seconds,
        "final_epoch_loss": result.epoch_loss[-1],
        "hidden_nodes_kept": kept,
    }
    print(json.dumps(row), flush=True)
    return row


def _probe(kind: str, model: str, root: str | None) -> None:
    """One memory measurement in this (fresh) process: prints a JSON line."""
    torch.set_num_threads(1)
    splits = load_fashion_mnist(root, seed=0, val_size=CAL, cal_size=0)
    cal = splits.val  # 50,000 images: the memory depends on their number, not on which
    bnet = bp.load(model, lenet_300_100())
    reset = _reset_peak()
    before = _status_mb("VmRSS") if reset else _peak_mb()
    t0 = time.perf_counter()
    if kind == "certify":
        cert = bp.certificate.certify(bnet, loader(cal, BATCH, shuffle=False), alpha=0.05,
                                      progress=False, max_levels=10)  # fmt: skip
        extra = {"level": cert.level}
    elif kind == "predict_batched":
        for x, _ in loader(cal, BATCH, shuffle=False):
            bnet.predict(x, num_samples=32, seed=0)
        extra = {}
    else:
        bnet.predict(cal.tensors[0], num_samples=32, seed=0)
        extra = {}
    row = {
        "operation": kind,
        "images": len(cal),
        "batch": None if kind == "predict_whole" else BATCH,
        "num_samples": None if kind == "certify" else 32,
        "data_mb": cal.tensors[0].numel() * 4 / 2**20,
        "rss_before_mb": before,
        "peak_rss_mb": _peak_mb(),
        "peak_reset": reset,
        "seconds": time.perf_counter() - t0,
        **extra,
    }
    row["peak_increase_mb"] = row["peak_rss_mb"] - before
    print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", nargs="+", type=int, default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all (default: 2)")
    p.add_argument("--train", type=int, default=6000, help="training images (default: 6000)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the certify/predict memory")
    p.add_argument("--memory-only", action="store_true",
                   help="re-measure the memory rows only, keeping the timing rows of --json")  # fmt: skip
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "distributed.json")
    p.add_argument("--probe", choices=("certify", "predict_batched", "predict_whole"),
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        _probe(args.probe, args.model, args.data_root)
        return
    splits = load_fashion_mnist(args.data_root, seed=0, subset=args.train)
    folder = Path(tempfile.mkdtemp(prefix="bayesprune-bench-"))
    model = folder / "lenet.safetensors"
    if args.memory_only:
        if args.no_memory:
            p.error("--memory-only and --no-memory exclude each other")
        _fit_row(1, args, splits.train, model, args.threads)  # the model to measure; time unused
        rows = []
    else:
        rows = [
            _fit_row(d, args, splits.train, model if d == 1 else None, args.threads)
            for d in args.devices
        ]
    if args.device == "cpu" and args.threads > 1 and 1 in args.devices and not args.memory_only:
        # one process on one thread too: the same CPU time per process as each of the N
        rows.append(_fit_row(1, args, splits.train, None, 1))
    memory = []
    if not args.no_memory and model.exists():
        for kind in ("certify", "predict_batched", "predict_whole"):
            cmd = [sys.executable, __file__, "--probe", kind, "--model", str(model)]
            if args.data_root:
                cmd += ["--data-root", args.data_root]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
            memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(out.stdout.strip().splitlines()[-1], flush=True)
    command = "python benchmarks/distributed.py " + " ".join(argv or sys.argv[1:])
    meta = {
        "command": command.strip(),
        "device": f"{args.device} ({platform.machine()}), {os.cpu_count()} cores"
        if args.device == "cpu"
        else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model": "lenet_300_100, node spike-and-slab (default fit)",
        "train_images": len(splits.train),
    }
    if args.memory_only:
        kept = json.loads(args.json.read_text())
        meta = {**kept["meta"], "memory_command": command.strip()}
        rows = kept["rows"]
    write_json(args.json, {"meta": meta, "rows": rows, "memory": memory})


if __name__ == "__main__":
    main()
