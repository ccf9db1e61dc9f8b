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
# # 01 Quickstart: a smaller LeNet-300-100 in four calls
#
# The path of every bayesprune run:
#
# 1. **train** (or bring) an ordinary `nn.Module`;
# 2. **bayesianize** it: every `Linear` / `Conv` layer gets a variational posterior and a
#    *node-level spike-and-slab prior*, a Bernoulli "is this neuron needed?" variable per node;
# 3. **fit** the posterior by stochastic variational inference (SVI, Pyro);
# 4. **prune** the nodes whose *posterior inclusion probability* (PIP) is below 0.5 and read the
#    compression report of the physically smaller network.
#
# Its small default settings are meant for a laptop CPU (the test suite runs it that way). Set the
# environment variable `BAYESPRUNE_TUTORIAL_FULL=1` for the full settings (all 50,000 training images,
# more epochs; a GPU helps).

# %%
import os

import torch

import bayesprune as bp
from bayesprune import plots
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.models import lenet_300_100

FULL = os.environ.get("BAYESPRUNE_TUTORIAL_FULL") == "1"
SUBSET = None if FULL else 2000  # training images (and test images) used
EPOCHS = 10 if FULL else 1  # dense training epochs
# variational inference epochs: the gates need a few hundred steps (19 epochs of 2,000 images are
# 304); with fewer, bp.fit warns that the PIPs have not separated
SVI_EPOCHS = 10 if FULL else 19
DEVICE = "cuda" if FULL and torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
if not FULL:
    torch.set_num_threads(1)

# %% [markdown]
# ## Data
# Fashion-MNIST from the Debian package `dataset-fashion-mnist` (nothing is downloaded). The split is
# deterministic: `train`, `val`, `cal` (calibration data for the guarantees of tutorial 03; training
# never sees it) and `test`.

# %%
splits = load_fashion_mnist(subset=SUBSET, seed=0)
train_loader = loader(splits.train, batch_size=128, seed=0)
test_loader = loader(splits.test, batch_size=1024, shuffle=False)
splits.sizes()

# %% [markdown]
# ## 1. Train the dense network
# Any `nn.Module` works; here LeNet-300-100 (784-300-100-10, 266,610 parameters).

# %%
dense = lenet_300_100()
bp.train(dense, train_loader, epochs=EPOCHS, device=DEVICE, seed=0, progress=False)
dense_acc = bp.evaluate(dense, test_loader)
print(f"dense test accuracy: {dense_acc:.4f}")

# %% [markdown]
# ## 2. Bayesianize
# `bayesianize` returns a `BayesianModule`: a Pyro model and guide around a copy of `dense` whose
# posterior means start at the trained weights. Every node $j$ of a layer gets a gate
# $z_j \sim \mathrm{Bernoulli}(\gamma_j)$ multiplying its output. With no `prior=`, the prior is
# `bp.priors.default_prior()`: prior inclusion 0.1, and on large data sets a price per parameter,
# $\operatorname{logit}\gamma_j = \min(\operatorname{logit} 0.1, -\lambda N m_j)$ for a node of
# $m_j$ parameters and $N$ training images ($\lambda = 2\cdot 10^{-6}$; `fit` supplies $N$), so
# that a node must be worth about $\lambda m_j$ nats of mean training loss whatever $N$.
#
# Two options trade a little for speed (measured in `benchmarks/README.md#svi-speed`):
# `weight_sd="rank1"` gives the weights rank-one posterior sds (one factor per node, one per
# input), cheaper SVI steps for an MLP on a CPU at the same accuracy in our runs;
# `reparam="auto"` draws convolution weights once per minibatch, much cheaper steps for ResNet-20
# on a CPU (less accurate at equal epochs in our short fits).

# %%
bnet = bp.bayesianize(dense)
bnet

# %% [markdown]
# ## 3. Fit the posterior
# `fit` maximises the evidence lower bound (ELBO) by SVI. The loss curve should fall and flatten.
#
# The default node spike-and-slab treats the gates $z_j$ as the random variables and fits the
# weights as point estimates, so the objective is
# $\mathbb E_{q(z)}[\log p(y \mid x, w, z)] - \mathrm{KL}(q(z) \,\|\, p(z))$: a node stays when it
# is worth more likelihood than its prior odds cost (above: 2.2 nats, or $\lambda N m_j$ where
# that is more). The gates move by
# natural-gradient steps (`bayesprune.natural`), so their PIPs end near 0 or 1 after a few hundred
# steps. `weights="gaussian"` gives the weights a mean-field Gaussian posterior too; its KL then
# weighs hundreds of nats per node and, on small data, switches nearly every node off
# (`benchmarks/README.md#robustness`).

# %%
result = bp.fit(bnet, train_loader, epochs=SVI_EPOCHS, device=DEVICE, seed=0, progress=False)
plots.plot_elbo(result)

# %% [markdown]
# The posterior inclusion probability $\pi_j = q(z_j = 1)$ of every node, sorted per layer. Nodes
# under the dashed line (0.5) are the ones the posterior considers unnecessary.

# %%
pips = bnet.inclusion_probs()
plots.plot_pips(pips)

# %% [markdown]
# ## 4. Prune and measure
# `prune` builds a *physically smaller* plain `nn.Module` (fewer rows and columns, not masks) from the
# posterior-mean weights of the kept nodes.

# %%
small = bp.prune(bnet, threshold=0.5)
small_acc = bp.evaluate(small, test_loader, device=DEVICE)
example = splits.test.tensors[0][:1]
report = bp.compression_report(dense.cpu(), small.cpu(), example, repeats=10)
print(report)
print(f"\ntest accuracy: dense {dense_acc:.4f}, pruned {small_acc:.4f}")

# %% [markdown]
# PIP $\ge$ 0.5 is the *median probability model*: each node is kept if the posterior thinks it more
# likely needed than not. Whether that keeps the accuracy depends on how well the posterior has
# been fitted (with the small default settings here, not well). Tutorial 03 replaces this rule of
# thumb by a level chosen on held-out data, with a guarantee on the accuracy drop.
#
# The pruned network is an ordinary module: save it as safetensors (no pickle) and load it back
# into the architecture.

# %%
import tempfile
from pathlib import Path

path = Path(tempfile.mkdtemp()) / "lenet_pruned.safetensors"
bp.save_pruned(small, path)
reloaded = bp.load_pruned(path, lenet_300_100)
assert bp.count_params(reloaded) == bp.count_params(small)
print(f"saved {path.name}: {bp.count_params(reloaded):,} parameters")

# %% [markdown]
# **Next:** tutorial 02 compares priors and looks at the posterior with ArviZ; tutorial 03 attaches
# a statistical guarantee to the accuracy of the pruned network.
