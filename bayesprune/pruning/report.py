"""Size and measured speed of a dense network and its pruned version (:func:`compression_report`)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._utils import resolve_device
from ..metrics import count_params, macs_by_layer, measure_latency
from ..registry import has_nodes, layer_spec
from .graph import to_module_device
from .layers import NORM_TYPES, REPLACED_TYPES, RemovedLayer, layer_widths

__all__ = [
    "CompressionReport",
    "LayerStats",
    "architecture_string",
    "compression_report",
]


def architecture_string(net: nn.Module) -> str:
    """Widths in the form of the pruning literature: conv filters, then the inputs of each Linear.

    (A registered layer family counts as a convolution when its spec has spatial axes, as a
    Linear otherwise.)

    LeNet-5-Caffe gives ``"20-50-800-500"``, LeNet-300-100 ``"784-300-100"``.

    >>> from bayesprune.pruning import architecture_string
    >>> from bayesprune.models import lenet5_caffe
    >>> architecture_string(lenet5_caffe())
    '20-50-800-500'
    """
    parts = []
    for m in net.modules():
        kind = m.kind if isinstance(m, REPLACED_TYPES) else type(m).__name__
        spatial = layer_spec(m).spatial_dims if has_nodes(m) else None
        if spatial or kind in ("Conv1d", "Conv2d", "Conv3d"):
            parts.append(layer_widths(m)[0])
        elif spatial == 0 or kind == "Linear":
            parts.append(layer_widths(m)[1])
    return "-".join(str(p) for p in parts)


@dataclass
class LayerStats:
    """One layer of a :class:`CompressionReport` (FLOPs are MACs per example)."""

    name: str
    kind: str
    width_before: int
    width_after: int
    in_before: int
    in_after: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclass
class CompressionReport:
    """Size and measured speed of a dense network and its pruned version.

    ``latency`` maps batch size -> ``(dense seconds, pruned seconds)``, medians of repeated
    wall-clock runs after warm-up on ``device``; ``speedup`` is their ratio, and
    ``speedup_range`` the lowest and highest speed-up of the single rounds (one dense and one
    pruned measurement, taken back to back): two runs of the same comparison differ by about that
    much. ``flop_reduction`` is the ratio of FLOP counts: a property of the architecture, not a
    measured speed-up.
    """

    layers: list[LayerStats]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    latency: dict[int, tuple[float, float]] = field(default_factory=dict)
    speedup_range: dict[int, tuple[float, float]] = field(default_factory=dict)
    device: str = "cpu"
    threads: int = 1
    architecture_before: str = ""
    architecture_after: str = ""

    @property
    def params_kept(self) -> float:
        return self.params_after / self.params_before

    @property
    def flops_kept(self) -> float:
        return self.flops_after / self.flops_before

    @property
    def flop_reduction(self) -> float:
        return self.flops_before / max(self.flops_after, 1)

    @property
    def speedup(self) -> dict[int, float]:
        return {bs: dense / small for bs, (dense, small) in self.latency.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (JSON-serialisable)."""
        return {
            "layers": [vars(s).copy() for s in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_kept": self.params_kept,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flops_kept": self.flops_kept,
            "flop_reduction": self.flop_reduction,
            "latency_s": {
                str(bs): {"dense": d, "pruned": s} for bs, (d, s) in self.latency.items()
            },
            "speedup": {str(bs): v for bs, v in self.speedup.items()},
            "speedup_range": {str(bs): list(v) for bs, v in self.speedup_range.items()},
            "device": self.device,
            "threads": self.threads,
            "architecture_before": self.architecture_before,
            "architecture_after": self.architecture_after,
        }

    def __str__(self) -> str:
        def pct(a: int, b: int) -> str:
            return f"{100 * a / b:.1f}%" if b else "-"

        rows = [("layer", "kind", "width", "inputs", "params", "kept", "FLOPs", "kept")]
        for s in self.layers:
            rows.append(
                (
                    s.name,
                    s.kind,
                    f"{s.width_before} -> {s.width_after}",
                    f"{s.in_before} -> {s.in_after}",
                    f"{s.params_before:,} -> {s.params_after:,}",
                    pct(s.params_after, s.params_before),
                    f"{s.flops_before:,} -> {s.flops_after:,}",
                    pct(s.flops_after, s.flops_before),
                )
            )
        rows.append(
            (
                "total",
                "",
                "",
                "",
                f"{self.params_before:,} -> {self.params_after:,}",
                pct(self.params_after, self.params_before),
                f"{self.flops_before:,} -> {self.flops_after:,}",
                pct(self.flops_after, self.flops_before),
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(-1, lines[1])
        lines.append(f"architecture: {self.architecture_before} -> {self.architecture_after}")
        lines.append(f"FLOP reduction: {self.flop_reduction:.2f}x (a count, not a timing)")
        for bs, (d, s) in self.latency.items():
            lo_hi = self.speedup_range.get(bs)
            spread = f" (single rounds {lo_hi[0]:.2f}-{lo_hi[1]:.2f}x)" if lo_hi else ""
            lines.append(
                f"latency on {self.device} ({self.threads} thread(s)), batch {bs}: dense "
                f"{d * 1e3:.3f} ms, pruned {s * 1e3:.3f} ms, measured speed-up {d / s:.2f}x{spread}"
            )
        return "\n".join(lines)


def _own_params(m: nn.Module) -> int:
    # a layer with node groups (attention) owns the projections it reads directly (out_proj)
    nodes = has_nodes(m) and layer_spec(m).nodes is not None
    return sum(p.numel() for p in m.parameters(recurse=nodes))


def _pruned_as(dense: nn.Module, small: nn.Module) -> bool:
    """Whether ``small`` is what the pruner makes of ``dense`` (its class, or the class its node
    groups become: ``nn.MultiheadAttention`` -> ``PrunedMultiheadAttention``)."""
    if type(small) is type(dense):
        return True
    nodes = layer_spec(dense).nodes if has_nodes(dense) else None
    return nodes is not None and type(small) is nodes.pruned_type


def _flops_checked(net: nn.Module, what: str, example_input: torch.Tensor) -> dict[str, int]:
    return macs_by_layer(net, to_module_device(example_input, net), what)


def compression_report(
    dense: nn.Module,
    small: nn.Module,
    example_input: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    batch_sizes: Iterable[int] = (1, 256),
    repeats: int = 30,
    warmup: int = 5,
    rounds: int = 3,
    progress: bool = True,
) -> CompressionReport:
    """Per-layer widths, parameters and FLOPs of ``dense`` and ``small``; their measured latency.

    Parameters
    ----------
    dense, small
        The network before and after pruning (same module paths; ``small`` may have its BatchNorms
        folded by :func:`bayesprune.fold_batchnorm`, reported as layers of width 0).
    example_input
        An input batch; its first example is repeated to each of ``batch_sizes`` for timing.
    device
        Where latency is measured (``"cpu"``, ``"cuda"``).
    batch_sizes
        Batch sizes to time; an empty tuple skips timing.
    repeats, warmup
        Timed and discarded passes per measurement (:func:`bayesprune.metrics.measure_latency`).
    rounds
        Measurements per net, alternating dense and pruned; the latency is their median.
    progress
        Show a progress bar over the latency measurements.

    Example
    -------
    >>> import torch
    >>> from bayesprune.pruning import compression_report, prune_module
    >>> from bayesprune.models import lenet_300_100
    >>> net = lenet_300_100(in_features=64)
    >>> small = prune_module(net, {"1": torch.arange(300) < 30}, torch.zeros(1, 64))
    >>> rep = compression_report(net, small, torch.zeros(1, 64), batch_sizes=())
    >>> round(rep.params_kept, 3)
    0.12
    """
    if not torch.is_tensor(example_input):
        raise TypeError("example_input must be a tensor (one input batch)")
    device = resolve_device(device)
    if count_params(small) > count_params(dense):
        raise ValueError(
            f"small has more parameters ({count_params(small):,}) than dense "
            f"({count_params(dense):,}): pass the dense network first, compression_report(dense, "
            "small, example_input)"
        )
    f_dense, f_small = (
        _flops_checked(net, what, example_input)
        for net, what in ((dense, "dense"), (small, "small"))
    )
    small_modules = dict(small.named_modules())
    dropped = {n for m in small.modules() if isinstance(m, RemovedLayer) for n in m.norms}
    layers = []
    for name, m in dense.named_modules():
        if name not in f_dense:
            continue
        s = small_modules.get(name)
        if isinstance(m, NORM_TYPES) and isinstance(
            s, nn.Identity
        ):  # folded, or its branch removed
            wb, ib = layer_widths(m)
            how = "removed" if name in dropped else "folded"
            layers.append(
                LayerStats(name, f"{type(m).__name__} ({how})", wb, 0, ib, 0,
                           _own_params(m), 0, f_dense[name], 0)
            )  # fmt: skip
            continue
        if isinstance(s, REPLACED_TYPES) and s.kind == type(m).__name__:
            how = "removed" if isinstance(s, RemovedLayer) else "constant"
            (wb, ib), (wa, ia) = layer_widths(m), layer_widths(s)
            layers.append(
                LayerStats(name, f"{s.kind} ({how})", wb, wa, ib, ia,
                           _own_params(m), _own_params(s), f_dense[name], 0)
            )  # fmt: skip
            continue
        if s is None or not _pruned_as(m, s):
            raise ValueError(
                f"small has no {type(m).__name__} at {name!r}: compare a network with its own "
                "pruned version"
            )
        (wb, ib), (wa, ia) = layer_widths(m), layer_widths(s)
        layers.append(
            LayerStats(
                name,
                type(m).__name__,
                wb,
                wa,
                ib,
                ia,
                _own_params(m),
                _own_params(s),
                f_dense[name],
                f_small.get(name, 0),
            )
        )
    if rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds}")
    latency, spread = {}, {}
    batch_sizes = list(batch_sizes)
    bar = tqdm(
        total=2 * rounds * len(batch_sizes), desc="latency", disable=not progress, leave=False
    )
    for bs in batch_sizes:
        x = example_input[:1].expand(bs, *example_input.shape[1:]).contiguous()
        times: tuple[list[float], list[float]] = ([], [])
        # alternate the two nets so that a slow spell of a shared machine hits both alike
        for _ in range(rounds):
            for net, out in ((dense, times[0]), (small, times[1])):
                out.append(measure_latency(net, x, device=device, repeats=repeats, warmup=warmup))
                bar.update()
        latency[int(bs)] = (statistics.median(times[0]), statistics.median(times[1]))
        ratios = [d / s for d, s in zip(*times, strict=True)]
        spread[int(bs)] = (min(ratios), max(ratios))
    bar.close()
    return CompressionReport(
        layers=layers,
        params_before=count_params(dense),
        params_after=count_params(small),
        flops_before=sum(f_dense.values()),
        flops_after=sum(f_small.values()),
        latency=latency,
        speedup_range=spread,
        device=str(device),
        threads=torch.get_num_threads(),
        architecture_before=architecture_string(dense),
        architecture_after=architecture_string(small),
    )
