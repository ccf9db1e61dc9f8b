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
# # 04 Your own network: a residual net end to end
#
# Nothing in bayesprune is specific to the reference models: `bayesianize` walks any `nn.Module`
# and swaps its `Linear` / `Conv1d` / `Conv2d` layers; `prune` traces the network with `torch.fx` to
# find which channels must be removed together. This tutorial takes **ResNet-20** (BatchNorm after
# every convolution, identity shortcuts that add feature maps) through the whole path, on the GPU
# when there is one:
#
# train → bayesianize → fit → certify a pruning level → compression report → save / load.
#
# Two things differ from an MLP:
#
# * **BatchNorm.** A node gate placed before a BatchNorm would be undone by the normalisation, so
#   the gate of a convolution that feeds a BatchNorm acts *after* it.
# * **Residual connections.** Channels joined by an addition (`x + block(x)`) must be kept or
#   removed together; `bp.dependency_groups` shows these groups, and `prune` removes a channel of a
#   group only when every layer of the group drops it (in ResNet-20 the outputs of all blocks of a
#   stage form one group, tied through the shortcuts; the inner channels of each block are free).
#
# Small settings by default (512 training images, one epoch: the pipeline, not the accuracy);
# `BAYESPRUNE_TUTORIAL_FULL=1` for the full data and a GPU if present.

# %%
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch.utils.data import Subset

import bayesprune as bp
from bayesprune import plots
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.models import resnet20

FULL = os.environ.get("BAYESPRUNE_TUTORIAL_FULL") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SUBSET = None if FULL else 512
EPOCHS = 15 if FULL else 1
SVI_EPOCHS = 10 if FULL else 1
N_CAL = None if FULL else 256  # calibration images used to certify
torch.manual_seed(0)
if DEVICE == "cpu" and not FULL:
    torch.set_num_threads(1)
print(f"device: {DEVICE}")

splits = load_fashion_mnist(subset=SUBSET, seed=0)
train_loader = loader(splits.train, batch_size=128, seed=0)
test_loader = loader(splits.test, batch_size=500, shuffle=False)
cal = splits.cal if N_CAL is None else Subset(splits.cal, range(N_CAL))
example = splits.test.tensors[0][:1]

# %% [markdown]
# ## Train the dense ResNet-20

# %%
dense = resnet20()
bp.train(dense, train_loader, epochs=EPOCHS, device=DEVICE, seed=0, progress=False)
dense_acc = bp.evaluate(dense, test_loader)
print(f"dense: {bp.count_params(dense):,} parameters, test accuracy {dense_acc:.4f}")

# %% [markdown]
# ## Channels that must go together
# Each group lists the layers whose output channels are tied (`producers`); a group with a `frozen`
# reason cannot be pruned (here: the network output).

# %%
groups = bp.dependency_groups(dense.cpu(), example)
for g in sorted(groups, key=lambda g: -len(g.producers))[:5]:
    print(f"{g.width:>3} channels  frozen={g.frozen or '-'}  producers={g.producers}")
print(f"... {len(groups)} groups in total")

# %% [markdown]
# ## Bayesianize and fit
# The group horseshoe gives each filter a scale; its PIP is the posterior probability that the
# filter is not shrunk away.

# %%
bnet = bp.bayesianize(dense, prior=bp.priors.GroupHorseshoe())
result = bp.fit(
    bnet, train_loader, epochs=SVI_EPOCHS, lr=1e-2, device=DEVICE, seed=0, progress=False
)
plots.plot_pips(bnet, ncols=5)

# %% [markdown]
# ## Certify a pruning level
# Candidates by PIP threshold; the risk is the accuracy drop against the unpruned posterior-mean
# network. If no candidate can be certified, `cert.model` is that unpruned network, whose drop
# against itself is zero: nothing pruned is handed back without a certificate.

# %%
cert = bp.conformal.certify(
    bnet, loader(cal, 250, shuffle=False), alpha=0.05, delta=0.1, reference="mean",
    max_levels=20 if FULL else 5, example_input=example.to(DEVICE), progress=False,
)  # fmt: skip
print(cert)
plots.plot_risk_curve(cert)

# %% [markdown]
# ## What the certified network costs
# `compression_report` counts parameters and FLOPs per layer and measures latency (median wall
# clock; on CPU here, so that the numbers do not depend on a GPU's launch overheads).

# %%
small = cert.model.cpu().eval()
timing = (
    {"batch_sizes": (1, 256), "repeats": 30}
    if FULL
    else {"batch_sizes": (1, 32), "repeats": 3, "warmup": 1}
)
report = bp.compression_report(dense.cpu(), small, example, **timing)
print(report)
print(f"test accuracy: dense {dense_acc:.4f}, certified {bp.evaluate(small, test_loader):.4f}")

# %% [markdown]
# ## Pruning for speed
# Two options of `bp.prune` trade size for wall-clock time. Convolutions left with a handful of
# filters run far below their kernels' efficiency, so `round_to=8` rounds each kept width up to a
# multiple of 8. A block whose first convolution the posterior switches off entirely still keeps
# one filter by default (`min_nodes=1`); `min_nodes=0` removes the whole branch, and the block
# becomes `relu(shortcut(x) + c)`. It is faster but less accurate after fine-tuning
# (`benchmarks/README.md#compression`, the `min_nodes 0` rows; the timings in
# `docs/notes/benchmark-history.md`, "Removing switched-off residual branches"). Fine-tune
# (`bp.finetune`) before comparing accuracies.

# %%
with warnings.catch_warnings(record=True) as caught:  # one warning per removed or floored layer
    warnings.simplefilter("always")
    fast = bp.prune(bnet, threshold=0.5, round_to=8, min_nodes=0, example_input=example.to(DEVICE))
print("\n".join(str(w.message)[:120] for w in caught))
fast = fast.cpu().eval()
print(bp.compression_report(dense.cpu(), fast, example, **timing).architecture_after)

# %% [markdown]
# ## Save and load
# Both the posterior and the pruned network are safetensors files: no pickle, no code execution on
# load. Loading needs the architecture (the files hold tensors, not code).

# %%
out = Path(tempfile.mkdtemp())
bnet.save(out / "resnet20_posterior.safetensors")
bp.save_pruned(small, out / "resnet20_certified.safetensors")
bnet2 = bp.load(out / "resnet20_posterior.safetensors", resnet20())
small2 = bp.load_pruned(out / "resnet20_certified.safetensors", resnet20).eval()
x = splits.test.tensors[0][:8]
with torch.no_grad():
    assert torch.allclose(small2(x), small(x), atol=1e-5)
print(sorted(p.name for p in out.iterdir()))

# %% [markdown]
# ## Fold BatchNorm for deployment
# The last step (after any fine-tuning with `bp.finetune`): `fold_batchnorm` merges each BatchNorm
# into the convolution before it, one operation where there were two, exact in eval mode. A folded
# network saves and loads like any pruned one. On a CPU it cuts batch-1 latency by 9-22%
# (`benchmarks/latency.py`, ResNet-20).

# %%
deployed = bp.fold_batchnorm(small, example_input=example)
with torch.no_grad():
    assert torch.allclose(deployed(x), small(x), atol=1e-4)
report = bp.compression_report(dense.cpu(), deployed, example, **timing)
print(
    f"BatchNorm layers left: {sum(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())}"
)
print({bs: f"{v:.2f}x" for bs, v in report.speedup.items()})
