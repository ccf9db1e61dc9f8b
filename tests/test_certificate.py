"""Tests of bayesprune/certificate.py: Learn-then-Test certificates, certify_candidates, certify."""

from __future__ import annotations

import copy
import itertools
import json
import math
import warnings

import pytest
import torch
from helpers import FakeBayesianModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune.certificate import (
    Certificate,
    certify,
    certify_candidates,
    default_levels,
    pip_candidates,
)
from bayesprune.conformal import ConformalClassifier
from bayesprune.data import loader
from bayesprune.models import lenet_300_100

# ------------------------------------------------------------------------------------------------
# fixtures: a small MLP trained on sklearn digits, and masked / pruned candidates of it
# ------------------------------------------------------------------------------------------------


def _node_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    return {"1": model[1].weight.detach().norm(dim=1), "3": model[3].weight.detach().norm(dim=1)}


KEEP = [0.9, 0.6, 0.3, 0.1, 0.04]


@pytest.fixture(scope="module")
def candidates(net) -> list[nn.Module]:
    with warnings.catch_warnings():  # the smallest keep fractions empty layer 1 (floored)
        warnings.filterwarnings("ignore", message="the node decisions keep 0")
        return [bp.prune(net, keep=f, scores=_node_scores(net)) for f in KEEP]


def _cal(digits, batch_size: int = 128) -> DataLoader:
    return loader(digits.cal, batch_size, shuffle=False)


# ------------------------------------------------------------------------------------------------
# certify_candidates / certify
# ------------------------------------------------------------------------------------------------


def test_certify_candidates_on_digits(net, candidates, digits, tmp_path) -> None:
    cert = certify_candidates(
        candidates, net, _cal(digits), risk="accuracy_drop", alpha=0.05, delta=0.1,
        levels=KEEP, level_name="keep", progress=False,
    )  # fmt: skip
    assert cert.n == len(digits.cal) and cert.pvalue == "binomial"
    assert len(cert.curve) == len(KEEP)
    kept = [row["params_kept"] for row in cert.curve]
    assert all(a > b for a, b in itertools.pairwise(kept))
    # the curve is what learn_then_test sees: recompute the risks by hand
    x, y = digits.cal.tensors
    with torch.no_grad():
        ref = net(x).argmax(-1)
        for row, cand in zip(cert.curve, candidates, strict=True):
            pred = cand(x).argmax(-1)
            assert row["risk_hat"] == pytest.approx(
                float(((pred != y) & (ref == y)).double().mean())
            )
    assert cert.passed, str(cert)  # keeping 90% of nodes of a trained MLP loses (almost) nothing
    rejected = [row["rejected"] for row in cert.curve]
    assert rejected[: cert.index + 1] == [True] * (cert.index + 1)
    assert cert.index == len(KEEP) - 1 or not rejected[cert.index + 1]
    assert cert.model is candidates[cert.index] and cert.level == KEEP[cert.index]
    text = str(cert)
    assert "alpha=0.05" in text and "delta=0.1" in text and "params kept" in text
    cert.save(tmp_path / "cert.json")
    d = json.loads((tmp_path / "cert.json").read_text())
    assert d["index"] == cert.index and d["passed"] and d["n"] == cert.n
    back = Certificate.load(tmp_path / "cert.json")
    assert back.to_dict() == cert.to_dict() and back.model is None


def test_certify_candidates_none_pass_returns_dense(net, digits) -> None:
    torch.manual_seed(1)
    junk = lenet_300_100(in_features=64)  # untrained: disagrees with the dense net everywhere
    cert = certify_candidates([junk, junk], net, _cal(digits), alpha=0.05, progress=False)
    assert not cert.passed and cert.index is None and cert.model is net
    assert cert.params_kept == 1.0 and "unpruned network is returned, without a certificate" in str(
        cert
    )
    assert cert.to_dict()["passed"] is False


def test_certify_candidates_bonferroni_and_error_risk(net, candidates, digits) -> None:
    cert = certify_candidates(
        candidates, net, _cal(digits), risk="error", alpha=0.2, delta=0.1,
        method="bonferroni", pvalue="hb", progress=False,
    )  # fmt: skip
    assert cert.method == "bonferroni" and cert.pvalue == "hb"
    if cert.passed:
        assert cert.curve[cert.index]["p_value"] <= 0.1 / len(candidates)


def test_certify_candidates_refuses_training_loader(net, candidates, digits) -> None:
    train_loader = loader(digits.train, 64)
    with pytest.raises(ValueError, match="disjoint"):
        certify_candidates(candidates, net, train_loader, train_loader=train_loader)
    with pytest.raises(ValueError, match="disjoint"):  # a second loader over the same dataset
        certify_candidates(
            candidates, net, loader(digits.train, 32), train_loader=train_loader, progress=False
        )


def test_certify_candidates_bad_input(net, candidates, digits) -> None:
    cal = _cal(digits)
    for kwargs, match in [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.2), "alpha"),
        (dict(delta=1.0), "delta"),
        (dict(risk="loss"), "risk must be one of"),
        (dict(levels=[1, 2]), "levels"),
    ]:
        with pytest.raises(ValueError, match=match):
            certify_candidates(candidates, net, cal, progress=False, **kwargs)
    # alpha = 0.01, delta = 0.1 needs n >= 230: the 359 calibration points pass, 200 cannot
    small = loader(TensorDataset(*(t[:200] for t in digits.cal.tensors)), 64, shuffle=False)
    with pytest.raises(ValueError, match="at least n = 230"):
        certify_candidates(candidates, net, small, alpha=0.01, progress=False)
    certify_candidates(candidates, net, cal, alpha=0.01, progress=False)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        certify_candidates(candidates, net, empty, progress=False)
    bad_labels = loader(TensorDataset(digits.cal.tensors[0], digits.cal.tensors[1] + 5), 64)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        certify_candidates(candidates, net, bad_labels, progress=False)
    five = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(ValueError, match="5 class scores but the task has 10"):
        certify_candidates([five], net, cal, progress=False)
    with pytest.raises(ValueError, match="10 class scores but the task has 12"):
        certify_candidates(candidates, net, cal, num_classes=12, progress=False)
    with pytest.raises(ValueError, match="candidates is empty"):
        certify_candidates([], net, cal)
    with pytest.raises(TypeError, match="iterable"):
        certify_candidates(candidates, net, 3)
    x, y = digits.cal.tensors
    with pytest.raises(TypeError, match=r"cal_loader must yield.*dict with keys"):
        certify_candidates(candidates, net, [{"image": x, "label": y}], progress=False)
    with pytest.raises(TypeError, match="got 3 items per batch"):
        certify_candidates(candidates, net, [(x, y, torch.arange(len(y)))], progress=False)
    with pytest.raises(TypeError, match=r"cal_loader must yield.*dict with keys"):
        ConformalClassifier(net).calibrate([{"image": x, "label": y}], 0.1)


def test_default_levels() -> None:
    pips = {"a": torch.tensor([0.01, 0.01, 0.5, 0.9]), "b": torch.tensor([0.3, 0.99])}
    levels = default_levels(pips, max_levels=20)
    flat = torch.cat(list(pips.values()))
    kept = [int((flat >= t).sum()) for t in levels]
    assert levels == sorted(levels) and kept == sorted(kept, reverse=True)
    assert len(set(kept)) == len(kept) and kept[0] < len(
        flat
    )  # each prunes more, first prunes some
    assert levels[0] == 0.5 and all(t >= 0.5 for t in levels)  # the median-probability model first
    assert len(default_levels({"a": torch.rand(1000)}, max_levels=7)) <= 7
    assert default_levels({"a": torch.tensor([0.1, 0.2, 0.7])}) == [0.5]
    with pytest.raises(ValueError, match="node-level prior"):
        default_levels({})
    with pytest.raises(ValueError, match="same PIP"):
        default_levels({"a": torch.ones(3)})


@pytest.mark.filterwarnings("ignore:the node decisions keep 0")
def test_certify_bayesian_module_contract(net, digits, tmp_path) -> None:
    # PIPs: node scores rescaled to [0, 1], so that low-norm nodes have low inclusion probability
    scores = _node_scores(net)
    top = max(float(v.max()) for v in scores.values())
    bnet = FakeBayesianModule(net, {k: v / top for k, v in scores.items()})
    cert = certify(bnet, _cal(digits), alpha=0.05, delta=0.1, max_levels=6, progress=False)
    assert cert.level_name == "PIP threshold" and len(cert.curve) <= 6
    assert [r["level"] for r in cert.curve] == sorted(r["level"] for r in cert.curve)
    assert cert.passed, str(cert)
    small = cert.model
    assert isinstance(small, nn.Module) and bp.count_params(small) < bp.count_params(net)
    assert cert.params_kept == pytest.approx(bp.count_nonzero(small) / bp.count_nonzero(net))
    cert.save(tmp_path / "c.json")
    keep = certify(
        bnet, _cal(digits), by="keep", levels=[0.8, 0.4], reference="mean", progress=False
    )
    assert keep.level_name == "keep fraction" and len(keep.curve) == 2
    with pytest.raises(ValueError, match="increasing PIP thresholds"):
        certify(bnet, _cal(digits), levels=[0.5, 0.2], progress=False)
    with pytest.raises(ValueError, match="no node-level inclusion probabilities"):
        certify(FakeBayesianModule(net, {}), _cal(digits), progress=False)
    with pytest.raises(ValueError, match=r"PIP thresholds must be in \[0, 1\]"):
        certify(bnet, _cal(digits), levels=[0.5, 2.0], progress=False)
    with pytest.raises(TypeError, match="certify_candidates"):
        certify(net, _cal(digits))
    tl = loader(digits.train, 64)
    with pytest.raises(ValueError, match="disjoint"):
        certify(bnet, tl, train_loader=tl)


# ------------------------------------------------------------------------------------------------
# with the real Bayesian core (bayesianize + fit)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_bnet(net, digits):
    bnet = bp.bayesianize(net, bp.priors.SpikeAndSlab(level="node"))
    bp.fit(bnet, loader(digits.train, 64), epochs=2, lr=1e-3, progress=False, seed=0)
    return bnet


def test_certify_and_sets_with_a_fitted_bayesian_module(fitted_bnet, net, digits) -> None:
    cal = _cal(digits)
    cert = certify(fitted_bnet, cal, alpha=0.05, delta=0.1, max_levels=5, progress=False)
    assert 1 <= len(cert.curve) <= 5 and cert.n == len(digits.cal)
    assert isinstance(cert.model, nn.Module)
    assert "Pyro" not in type(cert.model).__name__ and not any(
        "pyro" in type(m).__module__ for m in cert.model.modules()
    )
    # the certified (or, failing that, the dense posterior-mean) network predicts 10 classes
    assert cert.model(digits.test.tensors[0][:3]).shape == (3, 10)
    # the output layer carries PIPs but is never pruned: every candidate keeps all 10 logits alive
    _, cands = pip_candidates(fitted_bnet, [1.0, 1e-3], by="keep")  # all / 1 node per layer
    assert "5" in fitted_bnet.inclusion_probs()
    for c in cands:
        assert (c[5].weight.abs().sum(1) > 0).all() and c[5].out_features == 10
    assert cands[1][1].out_features == 1 and cands[1][3].out_features == 1
    cp = ConformalClassifier(fitted_bnet, score="aps", num_samples=4).calibrate(cal, 0.1)
    assert cp.bayesian
    res = cp.evaluate(loader(digits.test, 128, shuffle=False))
    assert res["coverage"] >= 0.9 - 3 * math.sqrt(0.09 / 360)


# ------------------------------------------------------------------------------------------------
# what the certificate is relative to (issue: the guarantee says what it means)
# ------------------------------------------------------------------------------------------------


def test_certify_measures_the_drop_against_the_dense_network_by_default(
    fitted_bnet, net, digits, tmp_path
) -> None:
    cal = _cal(digits)
    cert = certify(fitted_bnet, cal, alpha=0.05, delta=0.1, max_levels=5, progress=False)
    assert cert.reference == "the dense network given to bayesianize"
    x, y = digits.cal.tensors
    with torch.no_grad():
        dense_pred = net.eval()(x).argmax(-1)
    assert cert.reference_accuracy == pytest.approx(float((dense_pred == y).float().mean()))
    # every risk of the curve is the drop relative to the user's dense net, recomputed by hand
    _, cands = pip_candidates(fitted_bnet, [r["level"] for r in cert.curve])
    for row, cand in zip(cert.curve, cands, strict=True):
        with torch.no_grad():
            pred = cand.eval()(x).argmax(-1)
        drop = float(((pred != y) & (dense_pred == y)).float().mean())
        assert row["risk_hat"] == pytest.approx(drop)
        assert row["accuracy"] == pytest.approx(float((pred == y).float().mean()))
    text = str(cert)
    assert "relative to the dense network given to bayesianize" in text
    assert (
        f"reference (the dense network given to bayesianize) {cert.reference_accuracy:.4f}" in text
    )
    assert not cert.model.training  # deployable: eval mode
    cert.save(tmp_path / "c.json")
    back = Certificate.load(tmp_path / "c.json")
    assert back.reference == cert.reference and back.accuracy == pytest.approx(cert.accuracy)
    # the other references say what they are
    pred_cert = certify(fitted_bnet, cal, max_levels=3, reference="predictive", progress=False)
    assert pred_cert.reference.startswith("the posterior predictive")
    mine = certify(fitted_bnet, cal, max_levels=3, reference=net, progress=False)
    assert mine.reference.startswith("the dense network passed as reference")
    assert [r["risk_hat"] for r in mine.curve] == pytest.approx(
        [r["risk_hat"] for r in certify(fitted_bnet, cal, max_levels=3, progress=False).curve]
    )
    with pytest.raises(ValueError, match="reference must be one of"):
        certify(fitted_bnet, cal, reference="dnse", progress=False)


def test_the_dense_reference_survives_save_and_load(fitted_bnet, net, digits, tmp_path) -> None:
    path = tmp_path / "b.safetensors"
    fitted_bnet.save(path)
    back = bp.load(path, lenet_300_100(in_features=64))  # fresh weights: not the dense ones
    x = digits.cal.tensors[0][:50]
    with torch.no_grad():
        torch.testing.assert_close(back.dense_module()(x), net.eval()(x))
    # a file saved without the dense weights (older bayesprune) cannot certify against them
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(path).items() if not k.startswith("dense_reference/")}
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["bayesprune"])
    meta.pop("dense_reference")
    save_file(state, str(tmp_path / "old.safetensors"), metadata={"bayesprune": json.dumps(meta)})
    old = bp.load(tmp_path / "old.safetensors", lenet_300_100(in_features=64))
    with pytest.raises(ValueError, match=r"reference=dense_net"):
        certify(old, _cal(digits), progress=False)
    assert certify(old, _cal(digits), reference=net, max_levels=2, progress=False).n > 0


def test_an_untrained_reference_is_flagged(fitted_bnet, digits) -> None:
    torch.manual_seed(0)
    untrained = lenet_300_100(in_features=64)
    with pytest.warns(UserWarning, match="Was it trained"):
        certify(fitted_bnet, _cal(digits), reference=untrained, max_levels=2, progress=False)


def test_nan_inputs_are_refused_by_calibration_and_evaluation(fitted_bnet, net, digits) -> None:
    x, y = (t.clone() for t in digits.cal.tensors)
    x[::3] = float("nan")
    bad = loader(TensorDataset(x, y), 128, shuffle=False)
    with pytest.raises(
        ValueError, match=r"calibration inputs hold NaN or infinite values \(43 of 128 rows\)"
    ):
        certify(fitted_bnet, bad, progress=False)
    with pytest.raises(ValueError, match="NaN or infinite"):
        certify_candidates([net], net, bad, progress=False)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ConformalClassifier(net).calibrate(bad, 0.1)
    cp = ConformalClassifier(net).calibrate(_cal(digits), 0.1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        cp.predict_sets(x[:4])
    with pytest.raises(ValueError, match="NaN or infinite"):
        bp.evaluate(net, bad)
    with pytest.raises(ValueError, match="NaN or infinite"):
        bp.evaluate(fitted_bnet, bad)
    inf = x.clone()
    inf[~torch.isnan(inf)] = 0.0
    inf[torch.isnan(inf)] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        bp.evaluate(net, loader(TensorDataset(inf, y), 128, shuffle=False))
    # a model that returns NaN scores for finite inputs is named
    nan_net = nn.Sequential(net, nn.Dropout(0.0))
    nan_net[1].register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.raises(ValueError, match="NaN class scores"):
        certify_candidates([net], nan_net, _cal(digits), progress=False)


def test_certify_traces_the_architecture_once_for_all_levels(monkeypatch) -> None:
    # one DependencyGraph serves every candidate level: a trace per mode, not ~6 per level
    import bayesprune.pruning.graph as graph
    from bayesprune.models import lenet5_caffe

    calls = []
    real = graph.symbolic_trace  # every trace of the pruner goes through it
    monkeypatch.setattr(graph, "symbolic_trace", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    bnet = bp.bayesianize(lenet5_caffe())
    bnet.num_data = 100
    with torch.no_grad():
        for layer in bnet.bayesian_layers.values():
            layer.gate_logit.normal_()
    x = torch.randn(32, 1, 28, 28)
    cal = DataLoader(TensorDataset(x, bnet.mean_module().eval()(x).argmax(-1)), batch_size=32)
    calls.clear()
    cert = certify(bnet, cal, by="keep", levels=[0.9, 0.7, 0.5, 0.3, 0.1], example_input=x[:1],
                   progress=False, alpha=0.5)  # fmt: skip
    assert len(cert.curve) == 5
    assert len(calls) <= 2, len(calls)  # eval and training mode, once


def test_the_readme_promises_what_certify_certifies() -> None:
    # word for word where they overlap: the README's reading of the guarantee is the certificate's
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    cert = Certificate(
        alpha=0.02, delta=0.1, n=100, risk="accuracy_drop", method="fixed_sequence",
        pvalue="binomial", index=0, level=0.5, risk_hat=0.0, p_value=0.01, params_kept=0.5,
        curve=[], reference="the dense network given to bayesianize",
    )  # fmt: skip
    assert f"the chosen model's {cert.risk_words} on new data is at most 0.02" in readme
    assert cert.guarantee.startswith(f"the chosen model's {cert.risk_words} on new data is <= 0.02")


def test_a_bayesian_reference_is_refused_and_the_callers_net_keeps_its_mode(net, digits) -> None:
    bnet = bp.bayesianize(net)
    with pytest.raises(TypeError, match="reference='predictive'"):
        certify_candidates([net], bnet, _cal(digits), progress=False)
    ref = copy.deepcopy(net).train()
    cert = certify_candidates([nn.Sequential(nn.Flatten(), nn.Linear(64, 10))], ref, _cal(digits),
                              alpha=0.01, progress=False)  # fmt: skip
    assert not cert.passed and cert.model is ref and ref.training  # the caller's net, untouched


def test_keep_fractions_take_tied_nodes_in_equal_shares_per_layer() -> None:
    """Gates left at their bounds by the exact tests tie: a keep fraction takes the same share
    of every layer, not the first layer's nodes (which would empty the last one)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    bnet = bp.bayesianize(net)
    first, second = bnet.bayesian_layers["0"], bnet.bayesian_layers["2"]
    with torch.no_grad():
        first.gate_logit.fill_(6.9)
        second.gate_logit.fill_(6.9)
    x = torch.zeros(1, 4)
    _, (half,) = pip_candidates(bnet, [0.5], by="keep", example_input=x)
    assert (half[0].out_features, half[2].out_features) == (4, 2)
    with torch.no_grad():
        second.gate_logit[3] = 7.0  # a higher score still comes first
    _, (one,) = pip_candidates(bnet, [1 / 12], by="keep", example_input=x)
    assert one[2].out_features == 1
    assert torch.allclose(one[2].bias, second.bias_loc[3:]), "the kept node is node 3"
