"""Results as data: the one writer of ``benchmarks/results/*.json`` for the benchmark scripts."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def _finite(obj):
    """``obj`` with every NaN or infinite float replaced by ``None`` (strict JSON has neither)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then
    ``os.replace``), so an interrupted run never leaves half a file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` as strict JSON (NaN and infinities become ``null``),
    atomically."""
    write_text(path, json.dumps(_finite(payload), indent=1, ensure_ascii=False, allow_nan=False))


def merge_rows(path: Path, rows: list[dict], key: Callable[[dict], object], field: str = "rows"):
    """Merge ``rows`` into the list ``payload[field]`` of the JSON at ``path`` and write it back:
    a saved row with the same ``key`` as a new one is replaced, the others are kept, and so are
    the file's other fields (``source``, ``note``). For tables built from several commands."""
    path = Path(path)
    payload = json.loads(path.read_text()) if path.exists() else {}
    new = {key(r) for r in rows}
    old = [r for r in payload.get(field, []) if key(r) not in new]
    payload[field] = old + rows
    write_json(path, payload)
