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
# # 03 Guarantees: a certified pruning level and conformal prediction sets
#
# A posterior tells us *which* nodes matter; it does not tell us how much accuracy a pruned network
# will lose on new data. bayesprune answers that with two distribution-free tools that need only a
# **calibration set** the training never saw:
#
# 1. **Learn then Test** (`bp.conformal.certify`): among candidate pruning levels, ordered from
#    least to most pruned, pick the most pruned one whose *risk* (here the accuracy drop relative to
#    the Bayesian model) is certified to be at most $\alpha$:
#    $$\Pr_{\text{calibration}}\big(R(\hat\lambda) \le \alpha\big) \ge 1 - \delta .$$
# 2. **Conformal prediction sets** (`bp.conformal.ConformalClassifier`): for each test image a set
#    of labels that contains the true one with probability at least $1-\alpha$.
#
# **How to read $\alpha$ and $\delta$.** $\alpha$ is the risk you tolerate (0.05 = five points of
# accuracy). $\delta$ is the probability that the *calibration set you happened to draw* misleads the
# procedure into certifying a level whose true risk exceeds $\alpha$. The guarantee is about the
# procedure over repeated calibration draws, for data from the same distribution as the
# calibration set; it says nothing about distribution shift. Below we check both statements
# empirically.
#
# Small settings by default; `BAYESPRUNE_TUTORIAL_FULL=1` for the full data.

# %%
import os

import numpy as np
import torch
from torch.utils.data import Subset

import bayesprune as bp
from bayesprune import plots
from bayesprune.conformal import ConformalClassifier, learn_then_test, risk_losses
from bayesprune.data import FASHION_MNIST_CLASSES, load_fashion_mnist, loader
from bayesprune.models import lenet_300_100

FULL = os.environ.get("BAYESPRUNE_TUTORIAL_FULL") == "1"
SUBSET = None if FULL else 5000
EPOCHS = 10 if FULL else 2
SVI_EPOCHS = 10 if FULL else 2
SVI_LR = 1e-2
ALPHA, DELTA = 0.05, 0.1
DEVICE = "cuda" if FULL and torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
if not FULL:
    torch.set_num_threads(1)

splits = load_fashion_mnist(subset=SUBSET, seed=0)
train_loader = loader(splits.train, batch_size=128, seed=0)
dense = lenet_300_100()
bp.train(dense, train_loader, epochs=EPOCHS, device=DEVICE, seed=0, progress=False)
bnet = bp.bayesianize(dense, prior=bp.priors.GroupHorseshoe())
bp.fit(bnet, train_loader, epochs=SVI_EPOCHS, lr=SVI_LR, device=DEVICE, seed=0, progress=False)

# %% [markdown]
# ## Two disjoint calibration halves
# The `cal` split (5,000 images) is split once more: one half certifies the pruning level, the other
# calibrates the prediction sets of the certified network. Re-using the same points for both would
# make the second step depend on the data that chose the network.

# %%
perm = torch.randperm(len(splits.cal), generator=torch.Generator().manual_seed(0)).tolist()
half = len(perm) // 2
cal_level = Subset(splits.cal, perm[:half])
cal_sets = Subset(splits.cal, perm[half:])
print(f"{len(cal_level)} points to certify the level, {len(cal_sets)} to calibrate the sets")

# %% [markdown]
# ## 1. Certify a pruning level
# The candidates are `bp.prune(bnet, threshold=t)` for increasing PIP thresholds $t$. For each one
# `certify` measures the accuracy drop on the calibration half, turns it into a p-value for the null
# hypothesis "risk $> \alpha$", and walks from the least pruned candidate onwards while the p-value
# is below $\delta$ (fixed-sequence testing).
#
# The accuracy drop is measured against a *reference*: `reference="predictive"` (the default) is the
# posterior predictive, averaged over posterior draws; `reference="mean"`, used here, is the
# unpruned posterior-mean network, the network the candidates are cut from. After a short fit the
# two can differ by several points, which the risk would then charge to every candidate.

# %%
cert = bp.conformal.certify(
    bnet, loader(cal_level, 512, shuffle=False), alpha=ALPHA, delta=DELTA, reference="mean",
    max_levels=20 if FULL else 10, progress=False,
)  # fmt: skip
print(cert)
plots.plot_risk_curve(cert)

# %%
test_loader = loader(splits.test, 1024, shuffle=False)
small = cert.model
reference = bnet.mean_module().eval()
ref_acc = bp.evaluate(reference, test_loader)
small_acc = bp.evaluate(small, test_loader, device=DEVICE)
print(f"test accuracy: posterior-mean network {ref_acc:.4f}, certified network {small_acc:.4f}")
print(f"parameters kept: {bp.count_params(small) / bp.count_params(dense):.1%}")

# %% [markdown]
# ## What $\alpha$ and $\delta$ mean, checked by simulation
# The guarantee is a statement about repeating the whole procedure with fresh calibration sets. We
# can imitate that exactly: treat the pool of calibration and test images as the *population*,
# compute every candidate's per-image loss once (so each candidate's true risk is its mean loss on
# the pool), and repeatedly draw calibration sets of the same size from the pool (i.i.d., with
# replacement), run Learn then Test on each, and count how often the certified candidate's true risk
# exceeds $\alpha$. That frequency must be at most $\delta$.
#
# So that the simulation has something to certify even after the short fit of the small settings,
# $\alpha$ is raised, if needed, to just above the least pruned candidate's true risk (chosen from
# the population, before any calibration draw, so the guarantee still applies).

# %%
levels = [row["level"] for row in cert.curve]
candidates = [bp.prune(bnet, threshold=t).to(DEVICE).eval() for t in levels]
pool_x = torch.cat([splits.cal.tensors[0], splits.test.tensors[0]])
pool_y = torch.cat([splits.cal.tensors[1], splits.test.tensors[1]]).numpy()
with torch.no_grad():
    ref_pred = torch.cat([reference(x.to(DEVICE)).argmax(-1).cpu() for x in pool_x.split(2048)])
    cand_pred = np.stack(
        [
            torch.cat([c(x.to(DEVICE)).argmax(-1).cpu() for x in pool_x.split(2048)]).numpy()
            for c in candidates
        ]
    )
losses = risk_losses(cand_pred, ref_pred.numpy(), pool_y, "accuracy_drop")  # [candidates, pool]
true_risk = losses.mean(1)
alpha_sim = ALPHA if true_risk[0] < ALPHA / 2 else float(np.round(true_risk[0] + 0.01, 3))
print("true risk of each candidate:", np.round(true_risk, 3), f"-> alpha = {alpha_sim}")

rng = np.random.default_rng(0)
repeats, n_cal = (2000 if FULL else 300), half
certified, violations = 0, 0
for _ in range(repeats):
    draw = rng.integers(0, losses.shape[1], n_cal)
    res = learn_then_test(losses[:, draw], alpha=alpha_sim, delta=DELTA)
    if res.index is not None:
        certified += 1
        violations += true_risk[res.index] > alpha_sim
print(
    f"certified a candidate in {certified}/{repeats} repetitions; its true risk exceeded "
    f"alpha in {violations / repeats:.3f} of the repetitions (guarantee: at most delta = {DELTA})"
)

# %% [markdown]
# ## 2. Conformal prediction sets for the certified network
# The sets use the adaptive score (APS); `alpha=0.1` asks for 90% coverage. Coverage holds on
# average over test points; confident images get one label, hard ones several.

# %%
cp = ConformalClassifier(small, score="aps").calibrate(loader(cal_sets, 512, shuffle=False), 0.1)
report = cp.evaluate(test_loader)
print(f"coverage {report['coverage']:.3f} (target 0.9), mean set size {report['mean_size']:.2f}")
sets = torch.cat([cp.predict_sets(x) for x, _ in test_loader])
plots.plot_set_sizes(sets, num_classes=10, alpha=0.1)

# %%
for i in range(5):
    labels = [FASHION_MNIST_CLASSES[j] for j in torch.nonzero(sets[i]).ravel().tolist()]
    print(
        f"image {i}: true {FASHION_MNIST_CLASSES[int(splits.test.tensors[1][i])]!r}, set {labels}"
    )

# %% [markdown]
# The certificate is plain JSON, the network a safetensors file; together they are the deliverable:

# %%
import tempfile
from pathlib import Path

out = Path(tempfile.mkdtemp())
cert.save(out / "certificate.json")
bp.save_pruned(small.cpu(), out / "certified.safetensors")
print(sorted(p.name for p in out.iterdir()))
