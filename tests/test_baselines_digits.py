"""End to end on scikit-learn digits: every baseline runs and beats random pruning at its sparsity.

Fairness: the random baseline removes exactly as many units from every layer (structured: nodes per
layer; unstructured: entries per parameter tensor) as the method did, from the same network the
method prunes (the dense net; the posterior mean for self-compression). For the Gumbel masks,
which are learned *while* the weights train, the random masks are fixed from the start and trained
with the same epochs and learning rate from the same dense weights (random sparse training), so
both get the same budget. Random accuracies are averaged over five masks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bayesprune as bp
from bayesprune.baselines import MINT, SNACS, GumbelPruning, MagnitudePruning, SelfCompression
from bayesprune.data import load_digits, loader
from bayesprune.models import lenet_300_100
from bayesprune.train import evaluate, train

pytestmark = pytest.mark.slow  # real training of every baseline on digits

N_RANDOM = 5


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    splits = load_digits(seed=0, flatten=True)
    tr = loader(splits.train, 64, seed=0)
    te = loader(splits.test, 512, shuffle=False)
    net = lenet_300_100(in_features=64)
    train(net, tr, epochs=20, lr=1e-3, progress=False, seed=0)
    return net, tr, te, splits


def _random_like(masks: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random masks with the same number of kept entries in every tensor."""
    out = {}
    for name, m in masks.items():
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=gen)[: int(m.sum())]] = True
        out[name] = flat.view(m.shape)
    return out


def _random_accuracy(method, masks, te) -> float:
    gen = torch.Generator().manual_seed(1)
    accs = [evaluate(method.apply(_random_like(masks, gen)), te) for _ in range(N_RANDOM)]
    return sum(accs) / len(accs)


def _check(method, level, te, dense_acc):
    result = method.result(level)
    acc = evaluate(result.module, te)
    rand = _random_accuracy(method, result.masks, te)
    assert result.params_kept < 0.5, f"{method.name} pruned too little: {result.params_kept:.3f}"
    assert acc > rand, f"{method.name}: {acc:.3f} not above random {rand:.3f}"
    assert acc <= dense_acc + 0.05
    return acc, rand, result


def test_magnitude_beats_random(setup):
    net, tr, te, _ = setup
    _check(MagnitudePruning().fit(net, tr), 0.9, te, evaluate(net, te))


def test_structured_magnitude_beats_random_over_levels(setup):
    # Without fine-tuning, node norms are only a weak signal in this small MLP: at a single level
    # random masks sometimes do as well (seed-dependent), so the comparison is the mean accuracy
    # over a range of levels, each against random masks with the same nodes per layer.
    net, tr, te, _ = setup
    m = MagnitudePruning(structured=True).fit(net, tr)
    levels = (0.5, 0.6, 0.7, 0.8, 0.9)
    accs, rands = [], []
    for level in levels:
        res = m.result(level)
        assert res.module[1].out_features + res.module[3].out_features <= 400 * (1 - level) + 1
        accs.append(evaluate(res.module, te))
        rands.append(_random_accuracy(m, res.masks, te))
    assert sum(accs) / len(accs) > sum(rands) / len(rands), (accs, rands)


def test_magnitude_certify_runs_with_paper_protocol(setup):
    net, tr, _, splits = setup
    cal = loader(splits.cal, 512, shuffle=False)
    m = MagnitudePruning().fit(net, tr)
    levels = [i / 10 for i in range(10)]
    cert = m.certify(
        cal, levels, alpha=0.1, delta=0.1, risk="error", pvalue="binomial", progress=False
    )
    assert len(cert.curve) == len(levels)
    if cert.index is not None:
        # every level up to the chosen one passed the fixed-sequence test
        assert all(c["rejected"] for c in cert.curve[: cert.index + 1])
        assert cert.risk_hat <= 0.1


def test_snacs_beats_random(setup):
    net, tr, te, _ = setup
    m = SNACS(per_class=60, n_ensemble=3, progress=False).fit(net, tr)
    assert set(m.upper_limits) == {"1", "3"}
    _check(m, m.snacs_level(), te, evaluate(net, te))


def test_mint_runs_end_to_end(setup):
    """MINT is not one of the four seed methods (it is here to time SNACS against), and its group
    scores do not beat random pruning on digits at these sample sizes, so only the run is checked."""
    net, tr, te, _ = setup
    m = MINT(per_class=40, progress=False).fit(net, tr)
    assert set(m.scores) == {"1", "3"}
    result = m.result(0.7)
    assert result.params_kept < 0.5
    assert result.module[1].out_features == int(result.masks["1"].sum())
    assert 0.1 < evaluate(result.module, te) <= evaluate(net, te) + 0.05


def test_self_compression_beats_random(setup):
    net, tr, te, _ = setup
    m = SelfCompression(
        "snr", epochs=20, rounds=2, round_fraction=0.4, round_epochs=5, progress=False
    )
    m.fit(net, tr)
    assert 0.35 < m.removed_fraction < 0.45
    _check(m, 0.7, te, evaluate(net, te))


def _train_fixed_mask(net, masks, tr, epochs, lr) -> torch.nn.Module:
    """Random sparse training: the same budget as the Gumbel run, with the mask fixed."""
    net = copy.deepcopy(net).train()
    params = dict(net.named_parameters())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in tr:
            eff = {n: params[n] * masks[n].float() for n in masks}
            loss = F.cross_entropy(functional_call(net, eff, (x,), strict=False), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m.float())
    return net.eval()


def test_gumbel_beats_random_sparse_training(setup):
    net, tr, te, _ = setup
    epochs = 20
    m = GumbelPruning(target_density=0.02, sparsity_weight=10.0, epochs=epochs, progress=False).fit(
        net, tr
    )
    res = m.result(m.trained_level)
    assert res.params_kept < 0.1
    acc = evaluate(res.module, te)
    gen = torch.Generator().manual_seed(1)
    rand = [
        evaluate(_train_fixed_mask(net, _random_like(res.masks, gen), tr, epochs, 1e-3), te)
        for _ in range(3)
    ]
    assert acc > sum(rand) / len(rand), (acc, rand)
    assert bp.count_nonzero(res.module) == sum(int(v.sum()) for v in res.masks.values())


@pytest.mark.parametrize(
    ("prior", "kl_weight"),
    [
        (lambda: bp.priors.SpikeAndSlab(level="node"), 1.0),
        (lambda: bp.priors.GroupHorseshoe(global_scale=0.01), 0.2),
    ],
    ids=["spike-and-slab", "group-horseshoe"],
)
def test_ours_beats_random(setup, prior, kl_weight):
    """Ours under the same rule: PIP >= 0.5 against random nodes, same count per layer.

    Spike-and-slab at the ELBO (kl_weight 1), its default: with point weights the KL is that of
    the gates alone, and the exact tests of the gate switches (bayesprune.gate_tests) keep the
    nodes the data need. (It was tempered to 0.02 when the weights were Gaussian and the full
    ELBO switched every hidden node off; at 0.02 the tested fit keeps 62% of the parameters,
    because a node then costs 0.02 x 2.2 nats.) The group horseshoe is tempered: its weights are
    Bayesian, and their KL outweighs the likelihood of 898 images. Its default global scale 1
    prunes nothing on digits in 20 epochs; 0.01 prunes (as on Fashion-MNIST,
    benchmarks/README.md#compression).
    """
    net, tr, te, _ = setup
    bnet = bp.bayesianize(net, prior=prior())
    bp.fit(bnet, tr, epochs=20, lr=1e-2, kl_weight=kl_weight, progress=False, seed=0)
    pips = bnet.inclusion_probs()
    masks = {k: pips[k] >= 0.5 for k in ("1", "3")}  # the output layer "5" is never pruned
    small = bp.prune(bnet, threshold=0.5, example_input=torch.zeros(1, 64))
    assert bp.count_params(small) < 0.5 * bp.count_params(net)
    acc = evaluate(small, te)
    gen = torch.Generator().manual_seed(1)
    rand = [evaluate(bnet.mean_module(_random_like(masks, gen)), te) for _ in range(N_RANDOM)]
    assert acc > sum(rand) / len(rand), (acc, rand)
    assert acc <= evaluate(net, te) + 0.05
