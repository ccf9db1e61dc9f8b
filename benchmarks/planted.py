"""Does node spike-and-slab find the planted units? Recovery against the gate-freeze length.

``bayesprune.data.planted_teacher``: 12 hidden units, of which the teacher uses the first 3. A fit
*recovers* the teacher when exactly those 3 units have PIP > 0.9 and the 9 others PIP < 0.1. For
each ``structure_delay`` of ``bp.fit`` (the fraction of the steps during which the gate logits
stay frozen; ``None``, the default, is 10% of the steps but at most one epoch) and each fit length,
this counts the fit seeds that recover it, and shows each fit's PIPs as a string (``#`` > 0.9,
``.`` < 0.1, ``?`` between).

    python benchmarks/planted.py                                  # CPU, about 2 minutes
    python benchmarks/planted.py --epochs 40 --delays default 0.1
"""

from __future__ import annotations

import argparse
import time

import torch

import bayesprune as bp
from bayesprune.data import loader, planted_teacher


def _delay(text: str) -> float | None:
    return None if text == "default" else float(text)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", nargs="+", type=int, default=[40, 160])
    p.add_argument("--delays", nargs="+", type=_delay, default=[0.1, 0.025, 0.0, None],
                   help="structure_delay values; 'default' for None")  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--prior-inclusion", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        "| SVI epochs | structure_delay | fits recovering the teacher | PIPs per fit seed | time |"
    )
    print("|---:|---|---:|---|---:|")
    rows = []
    for epochs in args.epochs:
        for delay in args.delays:
            start = time.perf_counter()
            pips = []
            for seed in args.seeds:
                task = planted_teacher()
                bnet = bp.bayesianize(
                    task.student,
                    prior=bp.priors.SpikeAndSlab(prior_inclusion=args.prior_inclusion),
                    likelihood="gaussian",
                    noise_scale=task.noise,
                )
                data = torch.utils.data.TensorDataset(task.x, task.y)
                bp.fit(bnet, loader(data, 100, seed=seed), epochs=epochs, lr=0.01,
                       structure_lr=0.1, structure_delay=delay, progress=False, seed=seed)  # fmt: skip
                pips.append(bnet.inclusion_probs()["0"])
            k = task.relevant
            ok = sum(bool((q[:k] > 0.9).all() and (q[k:] < 0.1).all()) for q in pips)
            shown = " ".join(
                "".join("#" if v > 0.9 else "." if v < 0.1 else "?" for v in q) for q in pips
            )
            label = "default (10%, at most 1 epoch)" if delay is None else f"{delay:g}"
            seconds = time.perf_counter() - start
            print(f"| {epochs} | {label} | {ok} of {len(pips)} | `{shown}` | {seconds:.0f} s |",
                  flush=True)  # fmt: skip
            rows.append(dict(epochs=epochs, delay=delay, recovered=ok, fits=len(pips)))
    print(
        f"\nSeeds {args.seeds}; prior inclusion {args.prior_inclusion}; torch {torch.__version__}"
    )
    return rows


if __name__ == "__main__":
    main()
