"""Pruning attention heads and feed-forward units of transformers: ours against magnitude pruning.

Two tasks, each: a dense network trained with ``bp.train``; then the default call
``bp.fit(bp.bayesianize(dense), train, epochs=E)`` (the epochs are the only knob), the posterior
predictive (16 draws), ``bp.prune(bnet, threshold=0.5)`` (the median-probability model) and that
network fine-tuned with ``bp.finetune`` for ``FINETUNE_EPOCHS``; against magnitude pruning of the
dense network at equal size: in every layer the same numbers of heads and feed-forward units as
ours, the heads with the largest norm of their q, k, v rows and out_proj columns (biases
included), the units with the largest ``linear1`` (``mlp.0``) row norm, removed with
``bp.prune_module`` and fine-tuned with the same budget. A second row per task prunes our network
to the issue's target size instead: in every layer half of the heads and at most half of the
units (fewer where the median-probability model keeps fewer), those of highest PIP
(:func:`half_masks`), against magnitude pruning with the same counts. A third row, ``prior``,
asks the prior for the size instead (the only change to the call): a second fit from the dense
network with ``SIZE_PRIOR`` (every node charged per parameter of its group: a head holds about 30
times the parameters of a feed-forward unit and pays 30 times as much), its median-probability
model fine-tuned with the same budget, against magnitude pruning with the same counts. The price
was chosen on the ViT (scratch runs; ``docs/transformers.md``) and is used unchanged on the
sequence task.

* ``vit``: torchvision's ``VisionTransformer(image_size=28, patch_size=7, num_layers=4,
  num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)`` with its ``conv_proj`` replaced by a
  1-channel ``nn.Conv2d(1, 64, 7, 7)`` (Fashion-MNIST is grey: a 1-channel patch embedding
  rather than the image repeated 3 times), on 20,000 Fashion-MNIST training images; the test
  set is the official 10,000 images.
* ``order``: a synthetic task (no download): sequences of 16 tokens from a vocabulary of 32 in
  which tokens 0 and 1 each occur once; the label is whether 0 comes before 1. An ``nn.Embedding``
  and a learned positional embedding, a 2-layer ``nn.TransformerEncoder`` (width 32, 4 heads,
  64 feed-forward units), mean-pooling and a Linear classifier.

FLOPs are ``bp.count_flops`` (MACs per example, the attention's sequence terms included);
latency is ``bp.measure_latency`` (median of 30 passes of a 64-example batch, 1 CPU thread).

    python benchmarks/transformers.py                   # both tasks (about 10 minutes, 1 thread)
    python benchmarks/transformers.py --tasks order     # one task
    python benchmarks/tables.py --write transformers    # the table of docs/transformers.md

Results go to ``benchmarks/results/transformers.json`` (rows merged by task).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from results_io import merge_rows
from torch import nn
from torch.utils.data import TensorDataset

import bayesprune as bp
from bayesprune.baselines.magnitude import node_norms
from bayesprune.data import load_fashion_mnist, loader

RESULTS = Path(__file__).parent / "results" / "transformers.json"
BATCH = 128
#: per task: training images / sequences, dense and fit epochs, fine-tuning epochs
SETTINGS = {
    "vit": {"train": 20_000, "epochs": 15, "finetune_epochs": 3},
    "order": {"train": 8_000, "epochs": 20, "finetune_epochs": 3},
}
#: the ``prior`` row: with point weights a node on costs -log-odds nats; here 0.25 nats per
#: parameter of its group (the default 0.1 charges every node 2.2 nats, whatever its size)
SIZE_PRIOR = {"prior_log_odds": -0.25, "per_parameter": True}


# -- the networks ------------------------------------------------------------------------------
def vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    net = VisionTransformer(
        image_size=28, patch_size=7, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
        num_classes=10,
    )  # fmt: skip
    net.conv_proj = nn.Conv2d(1, 64, 7, 7)  # grey images: a 1-channel patch embedding
    return net


class SequenceClassifier(nn.Module):
    """Token and position embeddings, a TransformerEncoder, mean-pooling, a Linear classifier."""

    def __init__(self, vocab=32, length=16, width=32, heads=4, ffn=64, layers=2, classes=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(1, length, width))
        layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(1))


def order_data(n: int, seed: int, vocab: int = 32, length: int = 16) -> TensorDataset:
    """Sequences where tokens 0 and 1 occur once each (the rest from 2..vocab-1); label: 0 first."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (n, length), generator=gen)
    pos = torch.rand(n, length, generator=gen).argsort(1)[:, :2]
    rows = torch.arange(n)
    x[rows, pos[:, 0]], x[rows, pos[:, 1]] = 0, 1
    return TensorDataset(x, (pos[:, 0] < pos[:, 1]).long())


# -- heads and units ---------------------------------------------------------------------------
def node_layers(net: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Path -> ("heads" | "units", module): the attentions and the feed-forward producers."""
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.MultiheadAttention | bp.PrunedMultiheadAttention):
            out[name] = ("heads", m)
        elif name.endswith(("linear1", "mlp.0")) and isinstance(m, nn.Linear):
            out[name] = ("units", m)
    return out


def counts(net: nn.Module) -> dict[str, int]:
    """Heads and feed-forward units, per layer."""
    return {
        k: m.num_heads if kind == "heads" else m.out_features
        for k, (kind, m) in node_layers(net).items()
    }


def magnitude_masks(dense: nn.Module, keep: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per layer, the ``keep[layer]`` heads / units of largest norm."""
    masks = {}
    for name, (_, m) in node_layers(dense).items():
        score = node_norms(m)  # RMS of a head's q, k, v rows and out_proj columns / a unit's row
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        mask[score.argsort(descending=True)[: keep[name]]] = True
        masks[name] = mask
    return masks


# -- one task ----------------------------------------------------------------------------------
def splits(task: str, seed: int):
    n = SETTINGS[task]["train"]
    if task == "vit":
        s = load_fashion_mnist(subset=n, val_size=1000, cal_size=1000, seed=seed)
        return s.train, s.test
    return order_data(n, seed), order_data(2000, seed + 1000)


def half_masks(bnet, dense: nn.Module, keep: dict[str, int]) -> dict[str, torch.Tensor]:
    """The issue's target size from our posterior: in every layer half of the heads, and of the
    units at most half (fewer where the median-probability model keeps fewer), ranked by PIP
    (ties by the gate logits)."""
    logits = bnet.inclusion_logits()
    masks = {}
    for name, (kind, m) in node_layers(dense).items():
        n = m.num_heads if kind == "heads" else m.out_features
        k = n // 2 if kind == "heads" else min(keep[name], n // 2)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[logits[name].detach().flatten().cpu().argsort(descending=True)[:k]] = True
        masks[name] = mask
    return masks


def against_magnitude(ours, dense, train, test, x, ft: dict) -> dict:
    """Ours pruned (and fine-tuned) against magnitude pruning with the same counts per layer."""
    row = {"pruned": bp.evaluate(ours, test)}
    ours_ft = copy.deepcopy(ours)
    bp.finetune(ours_ft, train, **ft)
    row["pruned_finetuned"] = bp.evaluate(ours_ft.eval(), test)
    keep = counts(ours)
    mag = bp.prune_module(copy.deepcopy(dense), magnitude_masks(dense, keep), x).eval()
    assert counts(mag) == keep, (counts(mag), keep)
    row["magnitude_pruned"] = bp.evaluate(mag, test)
    bp.finetune(mag, train, **ft)
    row["magnitude_finetuned"] = bp.evaluate(mag.eval(), test)
    total = counts(dense)
    kinds = {k: kind for k, (kind, _) in node_layers(dense).items()}
    for kind in ("heads", "units"):
        row[f"{kind}_kept"] = sum(v for k, v in keep.items() if kinds[k] == kind)
        row[f"{kind}_total"] = sum(v for k, v in total.items() if kinds[k] == kind)
    row["per_layer_kept"] = {k: [keep[k], total[k]] for k in total}
    for name, net in (("dense", dense), ("pruned", ours_ft)):
        row[f"params_{name}"] = bp.count_params(net)
        row[f"flops_{name}"] = bp.count_flops(net, x[:1])
        row[f"latency_ms_{name}"] = 1e3 * bp.measure_latency(net, x, repeats=30, warmup=5)
    row["params_magnitude"] = bp.count_params(mag)
    return row


@torch.no_grad()
def reinitialised(net: nn.Module, seed: int) -> nn.Module:
    """A copy of ``net`` (its shape) with fresh weights: every module's ``reset_parameters``, the
    attention projections Xavier-uniform with zero biases (as ``nn.MultiheadAttention`` starts),
    a ViT's class token zero and its positional embedding N(0, 0.02^2) (torchvision's start)."""
    torch.manual_seed(seed)
    new = copy.deepcopy(net)
    for m in new.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(getattr(m, "in_proj_weight", None), nn.Parameter):
            nn.init.xavier_uniform_(m.in_proj_weight)
            if m.in_proj_bias is not None:
                nn.init.zeros_(m.in_proj_bias)
                nn.init.zeros_(m.out_proj.bias)
    for name, p in new.named_parameters():
        if name.endswith("class_token"):
            p.zero_()
        elif name.endswith("pos_embedding") or name == "pos":
            p.normal_(0.0, 0.02)
    return new


def frontier(half_net: nn.Module, train, test, cfg: dict, seed: int) -> dict:
    """Two checks of the target's size (the ``half`` row): our pruned net fine-tuned for as many
    epochs as the dense net trained instead of ``finetune_epochs``; and the same shape trained
    from random weights for the dense epochs plus the fine-tuning epochs (what that shape can
    reach in this budget, not a pruning method)."""
    longer = copy.deepcopy(half_net)
    bp.finetune(longer, train, epochs=cfg["epochs"], progress=False, seed=seed)
    scratch = reinitialised(half_net, seed)
    epochs = cfg["epochs"] + cfg["finetune_epochs"]
    bp.train(scratch, train, epochs=epochs, progress=False, seed=seed)
    return {
        "pruned_finetuned_long": bp.evaluate(longer.eval(), test),
        "scratch_same_shape": bp.evaluate(scratch.eval(), test),
        "scratch_epochs": epochs,
    }


def fit_and_prune(dense, train, test, x, cfg: dict, seed: int, prior=None):
    """``bp.fit(bp.bayesianize(dense, prior=prior))`` for the task's epochs, then the posterior
    predictive (16 draws) and ``bp.prune(bnet, threshold=0.5)``: the fitted network, its row
    fields (predictive, fit seconds, the warnings of the prune) and the pruned network."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # positional embeddings stay point estimates (documented)
        bnet = bp.bayesianize(dense, prior=prior)
    fit = bp.fit(bnet, train, epochs=cfg["epochs"], progress=False, seed=seed)
    bnet.eval()
    row = {"predictive": bp.evaluate(bnet, test, num_samples=16)}
    row["fit_seconds"] = round(fit.seconds, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = bp.prune(bnet, threshold=0.5, example_input=x).eval()
    row["prune_warnings"] = [str(w.message)[:300] for w in caught]
    return bnet, row, ours


def size_prior_row(dense, train, test, x, ft: dict, cfg: dict, seed: int) -> dict:
    """The ``prior`` row: a fit with ``SIZE_PRIOR`` on every Bayesian layer, its
    median-probability model against magnitude pruning."""
    prior = bp.priors.SpikeAndSlab(level="node", **SIZE_PRIOR)
    _, fitted, ours = fit_and_prune(dense, train, test, x, cfg, seed, prior)
    row = {"variant": "prior", "size_prior": SIZE_PRIOR, **fitted}
    return row | against_magnitude(ours, dense, train, test, x, ft)


def run_task(task: str, seed: int = 0) -> list[dict]:
    """Three rows: ``threshold 0.5`` (the median-probability model), ``half`` (the target's
    size, :func:`half_masks`) and ``prior`` (:func:`size_prior_row`), each against magnitude
    pruning at its size."""
    cfg = SETTINGS[task]
    train_set, test_set = splits(task, seed)
    train = loader(train_set, BATCH, shuffle=True, seed=seed)
    test = loader(test_set, 500)
    x = next(iter(test))[0][:64]
    torch.manual_seed(seed)
    dense = vit() if task == "vit" else SequenceClassifier()
    t0 = time.perf_counter()
    bp.train(dense, train, epochs=cfg["epochs"], progress=False, seed=seed)
    dense_s = time.perf_counter() - t0
    dense.eval()
    base: dict = {"task": task, **cfg, "test": len(test_set), "seed": seed}
    base["dense"] = bp.evaluate(dense, test)

    bnet, fitted, ours = fit_and_prune(dense, train, test, x, cfg, seed)
    prune_warnings = fitted.pop("prune_warnings")
    base |= fitted
    base["dense_seconds"] = round(dense_s, 1)
    ft = {"epochs": cfg["finetune_epochs"], "progress": False, "seed": seed}
    median = {**base, "variant": "threshold 0.5", "prune_warnings": prune_warnings}
    median |= against_magnitude(ours, dense, train, test, x, ft)
    pips = bnet.inclusion_probs()
    median["pips"] = {k: [round(float(p), 3) for p in pips[k]] for k in counts(dense) if k in pips}
    half_net = bp.prune(bnet, masks=half_masks(bnet, dense, counts(ours)), example_input=x).eval()
    half = {**base, "variant": "half"}
    half |= against_magnitude(half_net, dense, train, test, x, ft)
    half |= frontier(half_net, train, test, cfg, seed)
    sized = size_prior_row(dense, train, test, x, ft, cfg, seed)
    rows = []
    for row in (median, half, {**base, **sized}):
        row["target"] = (
            row["heads_kept"] <= row["heads_total"] / 2
            and row["units_kept"] <= row["units_total"] / 2
            and row["pruned_finetuned"] >= row["dense"] - 0.01
        )
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=sorted(SETTINGS), default=["vit", "order"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {
        "command": " ".join(["python benchmarks/transformers.py", *sys.argv[1:]]),
        "device": f"cpu ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
    }
    for task in args.tasks:
        t0 = time.perf_counter()
        rows = run_task(task, args.seed)
        for row in rows:
            row["meta"] = meta
            row["seconds"] = round(time.perf_counter() - t0, 1)
        merge_rows(RESULTS, rows, key=lambda r: (r["task"], r.get("variant")))
        for row in rows:
            skip = ("pips", "prune_warnings", "meta", "per_layer_kept")
            print({k: v for k, v in row.items() if k not in skip}, flush=True)


if __name__ == "__main__":
    main()
