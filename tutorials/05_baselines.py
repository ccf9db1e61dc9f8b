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
# # 05 Baselines: four seed methods against the Bayesian posterior
#
# `bayesprune.baselines` implements four published pruning methods behind one interface
# (`fit(net, train_loader)`, `scores`, `prune(level)`, `candidates(levels)`, `certify(...)`):
#
# | method | idea |
# |---|---|
# | `MagnitudePruning(structured=True)` | remove the nodes with the smallest weight norm |
# | `SNACS` | score nodes by conditional mutual information with the next layer |
# | `GumbelPruning(granularity="node")` | learn keep/drop masks by Gumbel-softmax during training |
# | `SelfCompression` | a Gaussian variational posterior; remove nodes by signal-to-noise ratio |
#
# We compare them with the group-horseshoe posterior at **equal node budgets** (the same fraction
# of hidden nodes removed), then put every method through the **same** Learn-then-Test certificate,
# so that the comparison ends in a number with a guarantee: the smallest network whose accuracy drop
# is certified to be at most $\alpha$.
#
# Small settings by default (a 5,000-image subset, one epoch for the methods that train: expect
# rough numbers); `BAYESPRUNE_TUTORIAL_FULL=1` for the full data. `benchmarks/` holds the tables.

# %%
import os
import time

import torch
from torch.utils.data import Subset

import bayesprune as bp
from bayesprune.baselines import SNACS, GumbelPruning, MagnitudePruning, SelfCompression
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.models import lenet_300_100

FULL = os.environ.get("BAYESPRUNE_TUTORIAL_FULL") == "1"
SUBSET = None if FULL else 5000
EPOCHS = 10 if FULL else 2
METHOD_EPOCHS = 10 if FULL else 1  # Gumbel / self-compression / SVI training
N_CAL = None if FULL else 500
ALPHA, DELTA = 0.05, 0.1
DEVICE = "cuda" if FULL and torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
if not FULL:
    torch.set_num_threads(1)

splits = load_fashion_mnist(subset=SUBSET, seed=0)
train_loader = loader(splits.train, batch_size=128, seed=0)
test_loader = loader(splits.test, batch_size=1024, shuffle=False)
cal = splits.cal if N_CAL is None else Subset(splits.cal, range(N_CAL))
cal_loader = loader(cal, 512, shuffle=False)
example = splits.test.tensors[0][:1]

dense = lenet_300_100()
bp.train(dense, train_loader, epochs=EPOCHS, device=DEVICE, seed=0, progress=False)
dense.cpu().eval()
dense_acc = bp.evaluate(dense, test_loader)
print(f"dense test accuracy {dense_acc:.4f}")

# %% [markdown]
# ## Fit every method on the same trained network
# Each `fit` copies the network; the recorded time is the method's own cost.

# %%
methods = {
    "magnitude": MagnitudePruning(structured=True),
    "SNACS": SNACS(per_class=50 if not FULL else 200, progress=False),
    "Gumbel": GumbelPruning(granularity="node", target_density=0.5, epochs=METHOD_EPOCHS,
                            device=DEVICE, progress=False),
    "self-compression": SelfCompression(epochs=METHOD_EPOCHS, device=DEVICE, progress=False),
}  # fmt: skip
fit_time = {}
for name, method in methods.items():
    start = time.perf_counter()
    method.fit(dense, train_loader, example_input=example)
    fit_time[name] = time.perf_counter() - start

start = time.perf_counter()
bnet = bp.bayesianize(dense, prior=bp.priors.GroupHorseshoe())
bp.fit(bnet, train_loader, epochs=METHOD_EPOCHS, lr=1e-2, device=DEVICE, seed=0, progress=False)
fit_time["Bayesian (ours)"] = time.perf_counter() - start
{k: round(v, 2) for k, v in fit_time.items()}

# %% [markdown]
# ## Equal node budgets
# `level` is the fraction of hidden nodes removed (SNACS caps it per layer at its own limit, so it
# may remove fewer). For the posterior, `keep = 1 - level` keeps the nodes with the highest PIP.

# %%
levels = [0.3, 0.5, 0.7]
rows = []
for level in levels:
    for name, method in methods.items():
        small = method.prune(level)
        rows.append((level, name, bp.count_params(small), bp.evaluate(small, test_loader)))
    small = bp.prune(bnet, keep=1 - level).cpu().eval()
    rows.append((level, "Bayesian (ours)", bp.count_params(small), bp.evaluate(small, test_loader)))
dense_params = bp.count_params(dense)
print(f"{'removed':>8}  {'method':<17} {'params kept':>11} {'accuracy':>9}")
for level, name, params, acc in rows:
    print(f"{level:>8.0%}  {name:<17} {params / dense_params:>11.1%} {acc:>9.4f}")

# %% [markdown]
# ## One certificate for all
# Each method's candidates, least to most pruned, go through the same Learn-then-Test procedure on
# the same calibration images. The risk is the accuracy drop relative to the network the candidates
# are cut from (the dense network for the baselines, the posterior-mean network for ours).

# %%
grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9] if FULL else [0.1, 0.2, 0.4, 0.6]
certs = {
    name: method.certify(cal_loader, grid, alpha=ALPHA, delta=DELTA, progress=False)
    for name, method in methods.items()
}
certs["Bayesian (ours)"] = bp.conformal.certify(
    bnet, cal_loader, alpha=ALPHA, delta=DELTA, by="keep", levels=[1 - g for g in grid],
    reference="mean", progress=False,
)  # fmt: skip
print(f"alpha = {ALPHA}, delta = {DELTA}, {len(cal)} calibration images")
print(f"{'method':<17} {'certified level':>16} {'params kept':>11} {'test accuracy':>13}")
for name, cert in certs.items():
    model = cert.model.cpu().eval()
    level = "none" if not cert.passed else f"{cert.level_name} {cert.level:.2g}"
    kept = bp.count_nonzero(model) / dense_params
    print(f"{name:<17} {level:>16} {kept:>11.1%} {bp.evaluate(model, test_loader):>13.4f}")

# %% [markdown]
# Reading the table: a method that cannot certify any level returns its unpruned network; among the
# others, fewer parameters at the same guarantee is better. With the small settings the numbers are
# noisy; the benchmark table in `benchmarks/README.md#baselines` uses the full data (seed 0; shorter runs
# for LeNet-5-Caffe and ResNet-20).
