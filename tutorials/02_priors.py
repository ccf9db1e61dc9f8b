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
# # 02 Priors: spike-and-slab against group horseshoe, seen through ArviZ
#
# Which nodes a network needs is decided by the prior over node-level sparsity. bayesprune has two:
#
# * **spike-and-slab** (`bp.priors.default_prior()`, the default: `SpikeAndSlab(level="node",
#   price_per_example=2e-6)`): node $j$ has a gate $z_j \sim \mathrm{Bernoulli}(\gamma_j)$ with
#   $\operatorname{logit}\gamma_j = \min(\operatorname{logit} 0.1, -\lambda N m_j)$ ($m_j$ its
#   parameters, $N$ training examples); its posterior inclusion probability (PIP) is
#   $q(z_j = 1)$, a number the variational posterior holds directly.
# * **group horseshoe** (`bp.priors.GroupHorseshoe()`): node $j$'s weights share a scale
#   $\tilde s_j = \tau\lambda_j$ (regularised), with half-Cauchy $\lambda_j$ and $\tau$: most nodes are
#   shrunk to zero, a few escape. Its PIP is $P_q(\kappa_j < 1/2)$ for the shrinkage factor
#   $\kappa_j = 1/(1 + \tilde s_j^2 b_j^2 / (\rho r_l)^2)$, in closed form. Here $\tilde s_j b_j$ is
#   the size of node $j$'s weights in the posterior-mean network ($b_j$: RMS of its standardised
#   weights), and $r_l$ is the layer's median node size before the fit (for a pretrained net, the
#   typical size of a node's trained weights). With $\rho$ = `pip_reference` = 1/2, a node is pruned
#   once the posterior has shrunk it below half the layer's typical size.
#
# We fit both on the same network, compare their PIPs and pruned networks, and then look at the
# posterior with [ArviZ](https://python.arviz.org): `bp.to_arviz` turns the variational posterior
# into an `InferenceData` whose variables are named after the Pyro sample sites (`"3.gate"`,
# `"3.lambda_a"`, ...) and whose dimensions are named after the layer (`"3.node"`).
#
# Small settings by default (a 3,000-image subset: a quick demonstration, not a benchmark);
# `BAYESPRUNE_TUTORIAL_FULL=1` for the full data.

# %%
import os
import warnings

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import torch

import bayesprune as bp
from bayesprune import plots
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.models import lenet_300_100

FULL = os.environ.get("BAYESPRUNE_TUTORIAL_FULL") == "1"
SUBSET = None if FULL else 3000
EPOCHS = 10 if FULL else 2
# SVI epochs: the spike-and-slab gates need a few hundred steps (13 epochs of 3,000 images: 312)
SVI_EPOCHS = 10 if FULL else 13
SVI_LR = 1e-2
DRAWS = 400 if FULL else 80  # variational posterior draws for ArviZ
DEVICE = "cuda" if FULL and torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
if not FULL:
    torch.set_num_threads(1)

splits = load_fashion_mnist(subset=SUBSET, seed=0)
train_loader = loader(splits.train, batch_size=128, seed=0)
test_loader = loader(splits.test, batch_size=1024, shuffle=False)
dense = lenet_300_100()
bp.train(dense, train_loader, epochs=EPOCHS, device=DEVICE, seed=0, progress=False)
dense_acc = bp.evaluate(dense, test_loader)
print(f"dense test accuracy {dense_acc:.4f}")

# %% [markdown]
# ## Fit one posterior per prior
# `bayesianize` copies the network, so both start from the same trained weights.

# %%
priors = {
    "spike-and-slab": bp.priors.default_prior(),
    "group horseshoe": bp.priors.GroupHorseshoe(),
}
bnets, results = {}, {}
for name, prior in priors.items():
    bnet = bp.bayesianize(dense, prior=prior)
    results[name] = bp.fit(
        bnet, train_loader, epochs=SVI_EPOCHS, lr=SVI_LR, device=DEVICE, seed=0, progress=False
    )
    bnets[name] = bnet

# %% [markdown]
# ## Inclusion probabilities
# Sorted PIPs per layer. A sharp step means the posterior has made up its mind about which nodes
# matter; a flat line means it has not (yet), and a 0.5 threshold then keeps all or nothing.

# %%
for name, bnet in bnets.items():
    fig = plots.plot_pips(bnet)
    fig.suptitle(name)
    display_fig = fig  # in a notebook, `fig` on the last line of a cell shows it
display_fig

# %% [markdown]
# The pruned networks at PIP $\ge$ 0.5 (the *median probability model*), and at a fixed budget
# (`keep=0.3`: the 30% of nodes with the highest PIP), which compares the priors' *rankings* of the
# nodes independently of where their PIPs sit:

# %%
rows = []
for name, bnet in bnets.items():
    for kwargs in ({"threshold": 0.5}, {"keep": 0.3}):
        small = bp.prune(bnet, **kwargs)
        rows.append(
            (name, kwargs, bp.count_params(small) / bp.count_params(dense),
             bp.evaluate(small, test_loader, device=DEVICE))
        )  # fmt: skip
print(f"{'prior':<16} {'rule':<20} {'params kept':>12} {'accuracy':>9}")
for name, kwargs, kept, acc in rows:
    rule = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    print(f"{name:<16} {rule:<20} {kept:>12.1%} {acc:>9.4f}")
print(f"{'dense':<16} {'':<20} {1:>12.1%} {dense_acc:>9.4f}")

# %% [markdown]
# ## The posterior in ArviZ
# `bp.to_arviz(bnet, num_samples, data=...)` draws from the variational posterior $q$. With `data`
# it adds `posterior_predictive`, `log_likelihood` and `observed_data`, so the usual ArviZ tools
# apply. **These are independent draws from $q$, not MCMC**: `r_hat` $\approx 1$ and a large ESS
# are automatic and say nothing about how close $q$ is to the true posterior.

# %%
x_val, y_val = splits.val.tensors
n_val = 2000 if FULL else 300
idata = {
    name: bp.to_arviz(bnet, num_samples=DRAWS, data=(x_val[:n_val], y_val[:n_val]))
    for name, bnet in bnets.items()
}
idata["group horseshoe"]

# %% [markdown]
# `az.summary` names every layer and node. For the horseshoe, `"3.scale"` is the node scale
# $\tau\lambda_j$ of the second hidden layer (100 nodes):

# %%
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # constant draws (PIP 0 or 1) give NaN r_hat, with a warning
    summary = az.summary(idata["group horseshoe"], var_names=["3.scale"], kind="stats")
summary.sort_values("mean").iloc[[0, 1, 2, -3, -2, -1]]

# %% [markdown]
# A forest plot of the five most and five least important nodes of that layer, by PIP:

# %%
pip3 = bnets["group horseshoe"].inclusion_probs()["3"].numpy()
order = np.argsort(pip3)
nodes = np.concatenate([order[:5], order[-5:]]).tolist()
axes = az.plot_forest(
    idata["group horseshoe"], var_names=["3.scale"], coords={"3.node": nodes}, combined=True
)
axes[0].set_title("node scales, layer 3: least and most included nodes")

# %% [markdown]
# The spike-and-slab gates are Bernoulli draws; their posterior mean is a Monte-Carlo estimate of the
# PIP (the exact value is `bnet.inclusion_probs()`):

# %%
gates = idata["spike-and-slab"].posterior["3.gate"].mean(("chain", "draw")).values
exact = bnets["spike-and-slab"].inclusion_probs()["3"].numpy()
print(f"largest |MC estimate - exact PIP| over layer 3: {np.abs(gates - exact).max():.3f}")
az.plot_posterior(idata["group horseshoe"], var_names=["3.tau_a", "3.tau_b"], kind="hist", bins=20)

# %% [markdown]
# ## Which prior predicts better? PSIS-LOO on the validation subset
# `az.compare` ranks the two variational predictive distributions by leave-one-out expected log
# predictive density. The Pareto $\hat k$ stored in `idata.posterior.attrs["psis_khat"]` diagnoses
# the variational approximation itself (Yao et al. 2018): above 0.7, importance sampling could not
# correct $q$ towards the exact posterior, which is the expected situation with tens of thousands of
# weights. bayesprune's guarantees (tutorial 03) do not assume an exact posterior.

# %%
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    comparison = az.compare(idata)
print(comparison[["rank", "elpd_loo", "p_loo", "elpd_diff", "dse"]])
for name, d in idata.items():
    print(f"{name}: PSIS k-hat of q = {d.posterior.attrs['psis_khat']:.2f}")
plt.close("all")
