# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 Transformers: prune attention heads and feed-forward units, with a certificate
#
# `bp.bayesianize` gives every head of an `nn.MultiheadAttention` one gate (its query, key and
# value rows and its output-projection columns are one group) and every feed-forward unit of an
# `nn.TransformerEncoderLayer` (or of torchvision's ViT `EncoderBlock`) one gate. `bp.prune` then
# removes the heads and units whose posterior inclusion probability (PIP) is below the threshold:
# the pruned network is a plain `nn.Module` with `bp.PrunedMultiheadAttention` layers (fewer heads,
# same width) and narrower `linear1` / `linear2`. The embedding width, the residual stream every
# block adds into, is never pruned.
#
# `bp.certificate.certify` picks the most pruned of those networks whose accuracy drop against
# the dense network is certified on a calibration set the training never saw (Learn then Test,
# tutorial 03).
#
# The task is synthetic (no download): sequences of 16 tokens from a vocabulary of 32 in which
# tokens 0 and 1 occur once each; the label says whether 0 comes before 1. Attention has to find
# the two tokens and compare their positions.
#
# Small settings by default; `BAYESPRUNE_TUTORIAL_FULL=1` for more data and epochs.

# %%
import os

import torch
from torch import nn
from torch.utils.data import TensorDataset

import bayesprune as bp
from bayesprune.certificate import certify
from bayesprune.data import loader

FULL = os.environ.get("BAYESPRUNE_TUTORIAL_FULL") == "1"
N_TRAIN = 20_000 if FULL else 8000
EPOCHS = 20 if FULL else 6
torch.manual_seed(0)
torch.set_num_threads(1)


def order_data(n: int, seed: int, vocab: int = 32, length: int = 16) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (n, length), generator=gen)
    pos = torch.rand(n, length, generator=gen).argsort(1)[:, :2]  # where 0 and 1 go
    rows = torch.arange(n)
    x[rows, pos[:, 0]], x[rows, pos[:, 1]] = 0, 1
    return TensorDataset(x, (pos[:, 0] < pos[:, 1]).long())


train, cal, test = order_data(N_TRAIN, 0), order_data(2000, 1), order_data(2000, 2)
train_loader = loader(train, 128, seed=0)


# %% [markdown]
# ## A small transformer classifier
# Token and position embeddings, two encoder layers of 8 heads and 64 feed-forward units each,
# mean-pooling and a linear classifier. Any module built from `nn.MultiheadAttention`,
# `nn.TransformerEncoderLayer` / `nn.TransformerEncoder` or torchvision's `VisionTransformer`
# works the same way.


# %%
class Classifier(nn.Module):
    def __init__(self, vocab=32, length=16, width=32, heads=8, ffn=64, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(1, length, width))
        layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 2)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(1))


dense = Classifier()
bp.train(dense, train_loader, epochs=EPOCHS, lr=3e-3, seed=0, progress=False)
test_loader = loader(test, 500)
print(f"dense test accuracy {bp.evaluate(dense, test_loader):.4f}")

# %% [markdown]
# ## One gate per head and per feed-forward unit
# The embeddings stay deterministic (point estimates; `bayesianize` says so in a warning unless
# they are listed in `skip`). The PIPs are named by layer: one per head of each `self_attn`, one per unit
# of each `linear1`.

# %%
bnet = bp.bayesianize(dense, skip=["embed"])
bp.fit(bnet, train_loader, epochs=EPOCHS, seed=0, progress=False)
pips = bnet.inclusion_probs()
for name, p in pips.items():
    if name.endswith(("self_attn", "linear1")):
        kind = "heads" if name.endswith("self_attn") else "units"
        print(f"{name:28s} {kind}: {(p >= 0.5).sum()} of {p.numel()} with PIP >= 0.5")
print("head PIPs of layer 0:", [round(float(p), 2) for p in pips["encoder.layers.0.self_attn"]])

# %% [markdown]
# ## Certify a pruning level
# The heads' PIPs are 0 or 1. A feed-forward unit that the exact tests of the gate switches
# (`bayesprune.gate_tests`) switched off drifts from its bound toward the natural step's target
# (the prior inclusion, moved by the evidence), so many units end with PIPs between 0.1 and 0.5:
# the fit's warning counts them as undecided, although the median-probability model (PIP >= 0.5)
# leaves them out. With `by="keep"` the candidates are the top fractions of all
# nodes (heads and units together) ranked by PIP, from the median-probability model's share down;
# `certify` keeps the most pruned one whose accuracy drop against the dense network is at most
# $\alpha$ with probability $1-\delta$ over the calibration draw (fixed-sequence testing stops at
# the first candidate it cannot certify).

# %%
x = test.tensors[0][:64]
cert = certify(
    bnet, loader(cal, 500, shuffle=False), alpha=0.05, delta=0.1, train_loader=train_loader,
    by="keep", example_input=x, progress=False,
)  # fmt: skip
print(cert)
small = cert.model.eval()

# %% [markdown]
# ## What was removed
# The certified network is a plain module: fewer heads per attention, fewer feed-forward units,
# the same embedding width. FLOPs (`bp.count_flops`, multiply-adds per sequence) include the
# attention's terms in the sequence length.

# %%
for i, layer in enumerate(small.encoder.layers):
    print(
        f"layer {i}: {layer.self_attn.num_heads} of 8 heads "
        f"({type(layer.self_attn).__name__}), {layer.linear1.out_features} of 64 units"
    )
print(f"params {bp.count_params(dense):,} -> {bp.count_params(small):,}")
print(f"FLOPs  {bp.count_flops(dense, x[:1]):,} -> {bp.count_flops(small, x[:1]):,}")
print(f"test accuracy: dense {bp.evaluate(dense, test_loader):.4f}, certified pruned "
      f"{bp.evaluate(small, test_loader):.4f}")  # fmt: skip

# %% [markdown]
# The pruned network saves and loads like any other (`bp.save_pruned`, `bp.load_pruned` with a
# function that builds the dense architecture), and the certificate is plain JSON:

# %%
import tempfile
from pathlib import Path

out = Path(tempfile.mkdtemp())
bp.save_pruned(small, out / "small.safetensors")
cert.save(out / "certificate.json")
back = bp.load_pruned(out / "small.safetensors", Classifier).eval()
with torch.no_grad():
    assert torch.equal(back(x).argmax(-1), small(x).argmax(-1))
print(sorted(p.name for p in out.iterdir()))
