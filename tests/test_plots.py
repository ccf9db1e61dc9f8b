"""Figures render headless (Agg) and contain the artists they promise."""

from __future__ import annotations

import json
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from bayesprune import plots


def _lines_of(ax):
    return list(ax.get_lines())


def test_elbo_plain_list_and_moving_average(tmp_path):
    losses = list(np.linspace(100, 1, 200) + np.random.default_rng(0).normal(0, 1, 200))
    fig = plots.plot_elbo(losses)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    lines = _lines_of(ax)
    assert len(lines) == 2  # raw + moving average
    np.testing.assert_allclose(lines[0].get_ydata(), losses)
    assert len(lines[1].get_ydata()) == 200 - 10 + 1  # window = 200 // 20
    assert ax.get_xlabel() == "SVI step"
    fig.savefig(tmp_path / "elbo.png")
    assert (tmp_path / "elbo.png").stat().st_size > 1000


def test_elbo_from_fit_result_like_object_and_tensor():
    result = SimpleNamespace(loss=[5.0, 4.0, 3.0, 2.5, 2.4, 2.3], epoch_loss=[4.0, 2.4])
    fig = plots.plot_elbo(result, smooth=1)
    lines = _lines_of(fig.axes[0])
    assert len(lines) == 2  # raw + epoch markers, no smoothing
    np.testing.assert_allclose(lines[1].get_ydata(), [4.0, 2.4])
    fig = plots.plot_elbo(torch.tensor([3.0, 2.0, 1.0]))
    np.testing.assert_allclose(_lines_of(fig.axes[0])[0].get_ydata(), [3, 2, 1])
    # stored as ELBO (to maximise): plotted as the loss -ELBO
    fig = plots.plot_elbo({"elbo": [-3.0, -2.0]})
    np.testing.assert_allclose(_lines_of(fig.axes[0])[0].get_ydata(), [3, 2])


def test_elbo_draws_into_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert plots.plot_elbo([1.0, 0.5], ax=ax) is fig


@pytest.mark.parametrize(
    ("bad", "match"),
    [([1.0, float("nan")], "not finite at step 1"), ([], "empty"), (object(), "FitResult")],
)
def test_elbo_bad_input(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        plots.plot_elbo(bad)


def test_pips_sorted_per_layer_with_threshold():
    pips = {"1": torch.tensor([0.1, 0.9, 0.6, 0.2]), "3": [0.3, 0.99], "5": np.array([0.5])}
    fig = plots.plot_pips(pips, threshold=0.5, ncols=2)
    assert len(fig.axes) == 3  # the unused fourth panel is removed
    titles = [a.get_title() for a in fig.axes]
    assert titles == ["1: 2/4 kept", "3: 1/2 kept", "5: 1/1 kept"]
    step = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(step.get_ydata(), [0.9, 0.6, 0.2, 0.1])  # sorted descending
    thr = fig.axes[0].get_lines()[1]
    np.testing.assert_allclose(thr.get_ydata(), [0.5, 0.5])


def test_pips_from_module_like_object_and_layer_selection():
    bnet = SimpleNamespace(inclusion_probs=lambda: {"a": torch.rand(5), "b": torch.rand(3)})
    fig = plots.plot_pips(bnet, layers=["b"], threshold=None)
    assert [a.get_title() for a in fig.axes] == ["b"]
    assert len(fig.axes[0].get_lines()) == 1


@pytest.mark.parametrize(
    ("bad", "match"),
    [({}, "node-level prior"), ({"x": [1.5]}, r"\[0, 1\]"), ([0.1], "inclusion_probs")],
)
def test_pips_bad_input(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        plots.plot_pips(bad)


def test_pips_unknown_layer():
    with pytest.raises(KeyError, match="available"):
        plots.plot_pips({"a": [0.5]}, layers=["zzz"])


def test_pruning_curve_two_axes_and_chosen_line():
    fig = plots.plot_pruning_curve(
        [0.1, 0.5, 0.9], [0.9, 0.88, 0.6], [0.9, 0.4, 0.05], chosen=0.5, dense_accuracy=0.91
    )
    acc_ax, size_ax = fig.axes
    acc_lines = acc_ax.get_lines()
    np.testing.assert_allclose(acc_lines[0].get_ydata(), [0.9, 0.88, 0.6])
    np.testing.assert_allclose(size_ax.get_lines()[0].get_ydata(), [0.9, 0.4, 0.05])
    vlines = [ln for ln in acc_lines if list(ln.get_xdata()) == [0.5, 0.5]]
    assert len(vlines) == 1
    labels = [t.get_text() for t in acc_ax.get_legend().get_texts()]
    assert labels == ["accuracy", "dense accuracy", "parameters kept", "chosen (0.5)"]


def test_pruning_curve_from_dict_and_errors():
    fig = plots.plot_pruning_curve({"levels": [0, 1], "accuracy": [0.9, 0.8]})
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="2 values but levels has 3"):
        plots.plot_pruning_curve([0, 1, 2], [0.9, 0.8])
    with pytest.raises(TypeError, match="levels"):
        plots.plot_pruning_curve({"foo": 1})


def test_risk_curve_alpha_and_chosen():
    fig = plots.plot_risk_curve(
        [0.1, 0.3, 0.5], [0.01, 0.03, 0.2], alpha=0.05, chosen=0.3, upper=[0.03, 0.049, 0.3],
        delta=0.1,
    )  # fmt: skip
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 4  # risk, upper bound, alpha, chosen
    np.testing.assert_allclose(lines[2].get_ydata(), [0.05, 0.05])
    np.testing.assert_allclose(lines[3].get_xdata(), [0.3, 0.3])
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "alpha = 0.05, delta = 0.1" in texts
    assert "certified: pruning level 0.3" in texts


def test_risk_curve_from_certificate_like_and_no_level():
    cert = SimpleNamespace(levels=[1, 2, 3], risks=[0.2, 0.3, 0.4], alpha=0.1, delta=0.05,
                           chosen_level=None)  # fmt: skip
    fig = plots.plot_risk_curve(cert)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2  # risk and alpha; no chosen line
    assert "no candidate certified" in ax.get_title()
    with pytest.raises(ValueError, match="alpha must be in"):
        plots.plot_risk_curve([1], [0.1], alpha=2.0)
    with pytest.raises(TypeError, match="Certificate"):
        plots.plot_risk_curve({"levels": [1]})


def test_set_sizes_from_matrix_list_and_sizes():
    sets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    fig = plots.plot_set_sizes(sets, num_classes=3, alpha=0.1)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [0.25, 0.5, 0.25, 0.0])
    assert "alpha = 0.1" in ax.get_title()
    fig = plots.plot_set_sizes([{0}, {1, 2}, {3}])
    np.testing.assert_allclose([p.get_height() for p in fig.axes[0].patches], [0, 2 / 3, 1 / 3])
    fig = plots.plot_set_sizes(np.array([1, 1, 2]))
    assert len(fig.axes[0].patches) == 3
    with pytest.raises(ValueError, match="non-negative integers"):
        plots.plot_set_sizes([1.5])
    with pytest.raises(ValueError, match="smaller than the largest"):
        plots.plot_set_sizes([4], num_classes=2)


def test_risk_curve_from_real_certificate_and_its_json(tmp_path):
    from bayesprune.conformal import Certificate

    curve = [
        {"level": t, "params_kept": k, "risk_hat": r, "p_value": p, "rejected": p <= 0.1}
        for t, k, r, p in [(0.1, 0.9, 0.0, 0.001), (0.5, 0.5, 0.01, 0.04), (0.9, 0.1, 0.2, 1.0)]
    ]
    cert = Certificate(
        alpha=0.05, delta=0.1, n=500, risk="accuracy_drop", method="fixed_sequence", pvalue="hb",
        index=1, level=0.5, risk_hat=0.01, p_value=0.04, params_kept=0.5, curve=curve,
        level_name="PIP threshold",
    )  # fmt: skip
    cert.save(tmp_path / "c.json")
    for source in (cert, json.loads((tmp_path / "c.json").read_text())):
        ax = plots.plot_risk_curve(source).axes[0]
        lines = ax.get_lines()
        # default x axis: fraction of parameters kept, reversed (pruning grows to the right)
        np.testing.assert_allclose(lines[0].get_xdata(), [0.9, 0.5, 0.1])
        np.testing.assert_allclose(lines[0].get_ydata(), [0.0, 0.01, 0.2])
        np.testing.assert_allclose(lines[1].get_xdata(), [0.9, 0.5])  # the rejected nulls
        assert list(lines[-1].get_xdata()) == [0.5, 0.5]  # the certified candidate
        assert ax.xaxis_inverted()
        assert ax.get_xlabel() == "fraction of parameters kept"
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "certified: PIP threshold 0.5" in legend
    ax = plots.plot_risk_curve(cert, x="level").axes[0]
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), [0.1, 0.5, 0.9])
    assert ax.get_xlabel() == "PIP threshold"
    ax = plots.plot_risk_curve(cert, x="index").axes[0]
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), [1, 2, 3])
    with pytest.raises(ValueError, match="x must be"):
        plots.plot_risk_curve(cert, x="nope")


def test_real_fit_result_and_bayesian_module():
    import bayesprune as bp
    from bayesprune.data import loader

    x = torch.randn(256, 6)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    bnet = bp.bayesianize(
        torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
        prior=bp.priors.SpikeAndSlab(level="node"),
    )
    result = bp.fit(bnet, loader(data, 64), epochs=2, progress=False, seed=0)
    raw = plots.plot_elbo(result).axes[0].get_lines()[0]
    np.testing.assert_allclose(raw.get_ydata(), result.loss)
    fig = plots.plot_pips(bnet)
    pips = bnet.inclusion_probs()
    assert [a.get_title().split(":")[0] for a in fig.axes] == list(pips)
    np.testing.assert_allclose(
        fig.axes[0].get_lines()[0].get_ydata(), np.sort(pips["0"].numpy())[::-1], rtol=1e-6
    )
