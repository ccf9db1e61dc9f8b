"""The tables of ``docs/structured.md``, from ``benchmarks/results/structured.json`` (written by
``structured.py``; standard library only, used by ``tables.py``)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "structured.json"
#: points drawn in the table (the plots have all of them)
SHOWN = (0.02, 0.6)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def render_structured() -> list[str]:
    payload = json.loads(RESULTS.read_text())
    rows, checks = payload["rows"], payload.get("checks", [])
    lines = [
        "| net | method | nets with 2% to 60% of the parameters (params kept: test accuracy) |",
        "|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((r["params"], r["acc"]) for r in mine if r["method"] == method)
            if method != "dense":
                pts = [p for p in pts if SHOWN[0] <= p[0] <= SHOWN[1]] or pts[:1]
            text = ", ".join(f"{_pct(p)}: {a:.4f}" for p, a in dict.fromkeys(pts))
            lines.append(f"| {model} | {method} | {text} |")
    lines += [
        "",
        "| net | baseline | its nets with 5% to 50% of the parameters | ours at least as "
        "accurate (with at most as many parameters) | worst gap, points (baseline net) |",
        "|---|---|---:|---:|---|",
    ]
    for model in dict.fromkeys(c["model"] for c in checks):
        mine = [c for c in checks if c["model"] == model]
        for base in dict.fromkeys(c["baseline"] for c in mine):
            cs = [c for c in mine if c["baseline"] == base]
            met = sum(c["gap"] is not None and c["gap"] >= 0 for c in cs)
            worst = min(cs, key=lambda c: float("-inf") if c["gap"] is None else c["gap"])
            gap = "no net of ours that small" if worst["gap"] is None else f"{worst['gap']:+.2f}"
            lines.append(
                f"| {model} | {base} | {len(cs)} | {met} of {len(cs)} | {gap} "
                f"({_pct(worst['params'])}: {worst['acc']:.4f}) |"
            )
    commands = sorted({r["command"] for r in rows if r.get("command")})
    devices = sorted({r["device"] for r in rows if r.get("device")})
    lines += [
        "",
        "*From `results/structured.json`. No pruned net is fine-tuned. Measured by "
        + "; ".join(f"`{c}`" for c in commands)
        + f" on {', '.join(devices)}.*",
    ]
    return lines
