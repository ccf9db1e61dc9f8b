"""The speed tables, from ``benchmarks/results/``: the SVI step against deterministic training
(``svi_speed.json``, ``svi_predict.json``; the README's ``svi-speed``), ``bp.fit(compile=True)``
against eager (``compile_speed.json``; ``docs/compiled-step.md``) and the same on a GPU
(``*_gpu.json`` from ``benchmarks/gpu_check.sh``; ``docs/gpu.md``), and whole default fits
against dense training (``fit_cost.json``; ``docs/fit-cost.md``). Standard library only, used
by ``tables.py``, which also takes the provenance lines from here."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def origin(payload: dict, name: str) -> str:
    """The provenance line under a table: the file, its note, and where its numbers came from."""
    parts = [f"From `results/{name}`."]
    if payload.get("note"):
        parts.append(payload["note"])
    if payload.get("source"):
        parts.append(f"Numbers {payload['source']}.")
    elif payload.get("meta"):
        m = payload["meta"]
        parts.append(
            f"Measured by `{m.get('command', '?')}` on {m.get('device', '?')}, "
            f"torch {m.get('torch', '?')}."
        )
    return "*" + " ".join(parts) + "*"


def composite_origin(payload: dict, rows: list[dict], name: str) -> str:
    """The provenance of a table assembled from several commands, each row with its own."""
    parts = [f"From `results/{name}`."]
    if payload.get("note"):
        parts.append(payload["note"])
    transcribed = sum(1 for r in rows if r.get("source"))
    if transcribed == len(rows) and payload.get("source"):
        parts.append(f"Numbers {payload['source']}.")
    elif transcribed:
        parts.append(
            f"{transcribed} of {len(rows)} rows transcribed from benchmarks/RESULTS.md (their "
            "`source`); every row records its command."
        )
    else:
        parts.append("Every row records the command that measured it.")
    return " ".join(parts)


def render_svi_speed() -> list[str]:
    lines = step_table(load("svi_speed.json"), "svi_speed.json")
    lines[-1] += predict_note(load("svi_predict.json"), "svi_predict.json")
    return lines


def step_table(payload: dict, name: str) -> list[str]:
    """Methods by model: the ratio of each step to the deterministic step of the same run."""
    cells: dict[str, dict[str, str]] = {}
    models: list[str] = []
    order: list[str] = []  # methods in the order of the rows; a new one after its predecessor
    before, model = None, None
    for r in payload["rows"]:
        if r["model"] != model:
            before, model = None, r["model"]
        if model not in models:
            models.append(model)
        if r["method"] not in order:
            order.insert(order.index(before) + 1 if before else len(order), r["method"])
        before = r["method"]
        value = "n/a" if r.get("step") is None else f"{r['ratio']:.2f}x ({r['step']:.2f} ms)"
        extras = [f"ops {r['ops_ratio']:.1f}x"] if r.get("ops_ratio") is not None else []
        if r.get("peak_ratio") is not None:
            extras.append(f"mem {r['peak_ratio']:.2f}x")
        if extras:
            value = value[:-1] + "; " + "; ".join(extras) + ")"
        cells.setdefault(r["method"], {})[model] = value
    lines = [
        "| method | " + " | ".join(models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    for method in order:
        row = cells[method]
        lines.append(f"| {method} | " + " | ".join(row.get(m, "–") for m in models) + " |")
    provenance = composite_origin(payload, payload["rows"], name)
    counts = {r.get("peak_steps", 1) for r in payload["rows"] if r.get("peak_ratio") is not None}
    most = max(counts, default=1)
    of = "the peak memory of one step" if most == 1 else f"the highest peak memory of {most} steps"
    if len(counts) > 1:  # rows measured before several steps were taken: one step each
        of += " (of one step in the older rows)"
    lines += [
        "",
        "*Ratio to the deterministic step of the same run (ms per step; ops: ATen operators "
        f"dispatched per step, `--ops`; mem: {of}, with parameters and optimiser state, "
        f"`--memory`; same ratios). {provenance}*",
    ]
    return lines


def predict_note(predict: dict, name: str) -> str:
    """The posterior draws against a forward pass, as a sentence to go under a step table."""
    per_model: dict[str, list[str]] = {}
    for r in predict["rows"]:
        if r["method"].startswith("posterior draw"):
            what = r["method"].removeprefix("posterior draw, ")
            per_model.setdefault(r["model"], []).append(f"{what} {r['ratio']:.2f}x")
    if not per_model:
        return ""
    return (
        " *Posterior draws against one deterministic forward pass of the same batch: "
        + "; ".join(f"{m}: " + ", ".join(v) for m, v in per_model.items())
        + " ("
        + origin(predict, name).strip("*")
        + ")*"
    )


def render_compile_speed() -> list[str]:
    """``bp.fit(compile=True)`` against eager: per step, and whole short and long fits."""
    payload = load("compile_speed.json")
    lines = compile_step_rows(payload)
    lines += [
        "",
        "| LeNet-300-100 fit | steps | eager | compiled (ratio) | graphs compiled | predictive "
        "acc: eager / compiled | hidden PIP < 0.5: eager / compiled |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def each(values: list[float], fmt: str) -> str:
        return ", ".join(format(v, fmt) for v in dict.fromkeys(values))

    for r in payload["fits"]:
        runs = (
            f"median of {r['runs']}"
            if len(r["seeds"]) == 1
            else "seeds " + ", ".join(str(s) for s in r["seeds"])
        )
        lines.append(
            f"| {r['data']} ({r['train_images']:,}), {r['epochs']} epoch(s), {runs} | "
            f"{r['steps']} | {r['eager_s']:.2f} s | {r['compiled_s']:.2f} s ({r['ratio']:.1f}x) | "
            f"{r['graphs']} | {each(r['accuracy_eager'], '.4f')} / "
            f"{each(r['accuracy_compiled'], '.4f')} | {each(r['hidden_off_eager'], '.0%')} / "
            f"{each(r['hidden_off_compiled'], '.0%')} |"
        )
    m = payload["meta"]
    lines += [
        "",
        f"*Milliseconds per step: median after warm-up, the three steps timed in turn (batch "
        f"128, random data; ratio to the deterministic step). First compiled step: its wall time "
        f"with compilation of forward and backward; `compile_seconds`: what `FitResult` reports "
        f"(the same first step's forward and backward); break-even: steps until the per-step "
        f"gain repays the first step. Fits: wall time of `bp.fit(..., progress=False)`, "
        f"compilation included, arms alternated; graphs: dynamo graphs compiled in the fit. "
        f"Compile times {m['cache'].replace('cold: ', 'cold (')}). From "
        f"`results/compile_speed.json`. Measured by `{m['command']}` on {m['device']}, "
        f"{m['threads']} thread(s), torch {m['torch']}.*",
    ]
    return lines


def compile_step_rows(payload: dict) -> list[str]:
    """Per step: the deterministic step, the eager and the compiled ``bp.fit`` step."""
    # rows from before gate_tests was recorded timed the step with the tests
    step = (
        "bp.fit step without the gate tests"
        if all(r.get("gate_tests") is False for r in payload["steps"])
        else "bp.fit step"
    )
    lines = [
        f"| net | deterministic step | {step}, eager | compiled | compiled / eager | "
        "first compiled step | `compile_seconds` | break-even |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["steps"]:
        even = "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:,.0f} steps"
        lines.append(
            f"| {r['model']} | {r['det_ms']:.2f} ms | {r['eager_ms']:.2f} ms "
            f"({r['eager_ratio']:.2f}x) | {r['compiled_ms']:.2f} ms ({r['compiled_ratio']:.2f}x) | "
            f"{r['compiled_vs_eager']:.2f}x | {r['first_step_s']:.1f} s | {r['compile_s']:.1f} s | "
            f"{even} |"
        )
    return lines


def render_gpu() -> list[str]:
    """The GPU run of ``benchmarks/gpu_check.sh``: the SVI step, the posterior draws, and the
    compiled step against eager (the distributed rows are in the README's ``distributed``)."""
    lines = step_table(load("svi_speed_gpu.json"), "svi_speed_gpu.json")
    lines[-1] += predict_note(load("svi_predict_gpu.json"), "svi_predict_gpu.json")
    compiled = load("compile_speed_gpu.json")
    m = compiled["meta"]
    lines += [
        "",
        *compile_step_rows(compiled),
        "",
        f"*`bp.fit(..., compile=True)` against eager, per step: median after warm-up, the three "
        f"steps timed in turn (batch 128, random data; ratio to the deterministic step); first "
        f"compiled step with compilation, {m['cache'].replace('cold: ', 'cold (')}). "
        f"{origin(compiled, 'compile_speed_gpu.json').strip('*')}*",
    ]
    if (RESULTS / "fit_cost_gpu.json").exists():
        lines += ["", *render_fit_cost("fit_cost_gpu.json")]
    else:
        lines += ["", "*Whole default fits against dense training (`benchmarks/fit_cost.py`, a "
                  "step of `gpu_check.sh`): not yet run on a GPU.*"]  # fmt: skip
    return lines


def render_fit_cost(name: str = "fit_cost.json") -> list[str]:
    """Whole default fits against the dense training of the same net, data and steps
    (``benchmarks/fit_cost.py``; ``name``: its JSON under ``benchmarks/results/``)."""
    payload = load(name)
    rows = payload["rows"]
    first = {}  # each net's rows together, in the order of its first cell, shortest fit first
    for r in sorted(rows, key=lambda r: r["cell"]):
        first.setdefault(r["net"], r["cell"])
    rows = sorted(rows, key=lambda r: (first[r["net"]], r["steps"], r["cell"], r["seed"]))
    lines = [
        "| net | train images x epochs | steps | dense step | bp.fit step | without the tests | "
        "gate tests: count (gates), seconds, share of the fit | dense acc | pruned acc, params |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = r["tests_seconds"] / r["fit_seconds"] if r["fit_seconds"] else 0.0
        lines.append(
            f"| {r['net']} | {r['train_images']:,} x {r['epochs']} | {r['steps']:,} | "
            f"{r['dense_ms_per_step']:.2f} ms | {r['fit_ms_per_step']:.2f} ms "
            f"({r['ratio']:.2f}x) | {r['ratio_without_tests']:.2f}x | {r['tests']:,} "
            f"({r['gates']:,}), {r['tests_seconds']:.1f} s, {share:.0%} | {r['dense']:.4f} | "
            f"{r['pruned']:.4f}, {r['params']:.1%} |"
        )
    commands = sorted({r["command"] for r in rows})
    devices = sorted({f"{r['device']}, torch {r['torch']}" for r in rows})
    lines += [
        "",
        "*Per step: the wall time of `bp.fit(bp.bayesianize(net), loader, epochs=E, "
        "progress=False)` (every default; from the dense net) over its steps, against "
        "`bp.train(net, loader, epochs=E)` (the dense net, the same batches and steps) in the "
        "same run; without the tests: the fit's time less `FitResult.gate_tests['seconds']`. "
        "Pruned: `bp.prune(bnet, threshold=0.5)`, no fine-tuning, on the 10,000 test images. "
        f"From `results/{name}`. Measured by "
        + ", ".join(f"`{c}`" for c in commands)
        + " on "
        + "; ".join(devices)
        + ".*",
    ]
    return lines
