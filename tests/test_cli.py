"""The ``bayesprune`` command: every subcommand on scikit-learn digits, outputs checked; user errors
give one line on stderr and exit status 2."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune.cli import main
from bayesprune.conformal import Certificate
from bayesprune.models import lenet_300_100

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = ["--epochs", "1", "--pretrain-epochs", "2", "--no-progress", "--threads", "1"]


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One run directory through fit, prune, certify and report (digits, LeNet-300-100)."""
    out = tmp_path_factory.mktemp("run")
    fit = ["fit", "--model", "lenet_300_100", "--data", "digits", "--out", str(out)]
    assert main([*fit, "--reparam", "auto", "--weight-sd", "rank1", *QUICK]) == 0
    assert main(["prune", "--run", str(out), "--threshold", "0.5", "--no-progress",
                 "--levels", "0.8,0.5,0.2", "--finetune-epochs", "1"]) == 0  # fmt: skip
    assert main(["certify", "--run", str(out), "--alpha", "0.1", "--delta", "0.1",
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["report", "--run", str(out)]) == 0
    return out


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("bayesprune"), err
    assert match in err, err
    return err


def test_help(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for cmd in ("fit", "prune", "certify", "report"):
        assert cmd in text
        assert main([cmd, "--help"]) == 0
        assert "--run" in capsys.readouterr().out or cmd == "fit"
    assert main([]) == 2  # no subcommand: help, exit 2


def test_fit_outputs(run_dir):
    cfg = json.loads((run_dir / "run.json").read_text())
    assert cfg["model"] == "lenet_300_100" and cfg["data"] == "digits"
    assert cfg["input_shape"] == [1, 8, 8]
    assert cfg["reparam"] == "auto" and cfg["weight_sd"] == "rank1"
    assert (
        cfg["prior_spec"]["type"] == "SpikeAndSlab" and cfg["prior_spec"]["prior_inclusion"] == 0.1
    )
    fit = json.loads((run_dir / "fit.json").read_text())
    assert len(fit["loss"]) == 8 and np.all(np.isfinite(fit["loss"]))  # 898 / 128 -> 8 steps
    assert set(fit["pips"]) == {"1", "3", "5"} and len(fit["pips"]["1"]) == 300
    assert 0.1 < fit["dense_val_accuracy"] <= 1
    for png in ("elbo.png", "pips.png"):
        assert _is_png(run_dir / png)
    bnet = bp.load(run_dir / "bayesian.safetensors", lenet_300_100(in_features=64))
    assert bnet.weight_sd == "rank1"
    np.testing.assert_allclose(bnet.inclusion_probs()["3"].numpy(), fit["pips"]["3"], rtol=1e-6)


def test_prune_outputs(run_dir):
    comp = json.loads((run_dir / "compression.json").read_text())
    small = bp.load_pruned(run_dir / "pruned.safetensors", lambda: lenet_300_100(in_features=64))
    assert bp.count_params(small) == comp["report"]["params_after"]
    fit = json.loads((run_dir / "fit.json").read_text())
    kept = sum(int((np.asarray(p) >= 0.5).sum()) for k, p in fit["pips"].items() if k != "5")
    assert small[1].out_features + small[3].out_features == kept
    assert [c["keep"] for c in comp["curve"]] == [0.8, 0.5, 0.2]
    assert comp["finetune_epochs"] == 1
    sizes = [c["params_kept"] for c in comp["curve"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.5
    assert _is_png(run_dir / "pruning_curve.png")


def test_certify_outputs(run_dir):
    cert = Certificate.load(run_dir / "certificate.json")
    assert (cert.alpha, cert.delta, cert.risk) == (0.1, 0.1, "accuracy_drop")
    assert cert.n == 359 // 2  # the first half of the calibration split
    certified = bp.load_pruned(
        run_dir / "certified.safetensors", lambda: lenet_300_100(in_features=64)
    )
    if cert.passed:
        assert cert.risk_hat <= cert.alpha
    assert bp.count_params(certified) > 0
    conf = json.loads((run_dir / "conformal.json").read_text())
    assert conf["calibration_examples"] == 359 - 359 // 2
    # split-conformal coverage >= 1 - alpha = 0.9 holds in expectation; 360 test points and 180
    # calibration points give a standard deviation of about 0.027, so 0.8 is a 3-sigma margin.
    assert conf["test_coverage"] >= 0.8
    assert sum(conf["size_histogram"]) == 360
    for png in ("risk_curve.png", "set_sizes.png"):
        assert _is_png(run_dir / png)


def test_report(run_dir):
    text = (run_dir / "report.md").read_text()
    for heading in ("# bayesprune report", "## Posterior", "## Pruning", "## Certificate",
                    "## Conformal prediction sets"):  # fmt: skip
        assert heading in text
    for png in ("elbo.png", "pips.png", "pruning_curve.png", "risk_curve.png", "set_sizes.png"):
        assert f"]({png})" in text
    # bp.fit's warnings are kept in fit.json and listed in the report: this one-epoch fit keeps
    # every hidden node (layers "1" and "3"; "5" is the output), and says so
    fit = json.loads((run_dir / "fit.json").read_text())
    assert all(fit["nodes_pip_ge_0.5"][k] == fit["nodes"][k] for k in ("1", "3"))
    assert any("keeps every hidden node" in w for w in fit["warnings"])
    for warning in fit["warnings"]:
        assert f"- {warning}" in text


def test_report_elsewhere_links_images(run_dir, tmp_path):
    assert main(["report", "--run", str(run_dir), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    # relative links, so that the report and the run directory can be moved together
    rel = os.path.relpath((run_dir / "elbo.png").resolve(), tmp_path.resolve())
    assert f"]({Path(rel).as_posix()})" in text and str(run_dir.resolve()) not in text


def test_fit_prior_and_objective_options(tmp_path, monkeypatch):
    seen = {}
    real_fit = bp.fit

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(bp, "fit", spy)
    out = tmp_path / "run"
    argv = ["fit", "--model", "lenet_300_100", "--out", str(out), "--prior", "horseshoe",
            "--global-scale", "0.01", "--kl-weight", "0.2", "--structure-delay", "0", *QUICK]  # fmt: skip
    assert main(argv) == 0
    assert seen["kl_weight"] == 0.2 and seen["structure_delay"] == 0
    cfg = json.loads((out / "run.json").read_text())
    assert cfg["prior_spec"]["type"] == "GroupHorseshoe"
    assert cfg["prior_spec"]["global_scale"] == 0.01
    fit = json.loads((out / "fit.json").read_text())
    assert fit["kl_weight"] == 0.2 and fit["structure_delay"] == 0
    bnet = bp.load(out / "bayesian.safetensors", lenet_300_100(in_features=64))
    assert {p.global_scale for p in bnet.priors.values()} == {0.01}
    assert main(["report", "--run", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "KL weight 0.2" in report and "horseshoe (global scale 0.01)" in report


def test_fit_prices_nodes_per_parameter(tmp_path):
    out = tmp_path / "run"
    argv = ["fit", "--model", "lenet_300_100", "--out", str(out), "--prior-log-odds", "-0.05",
            "--per-parameter", *QUICK]  # fmt: skip
    assert main(argv) == 0
    spec = json.loads((out / "run.json").read_text())["prior_spec"]
    assert spec["prior_log_odds"] == -0.05 and spec["per_parameter"] is True
    bnet = bp.load(out / "bayesian.safetensors", lenet_300_100(in_features=64))
    first = bnet.bayesian_layers["1"]  # 64 inputs and a bias per unit
    assert first.prior.per_parameter and first.prior.log_odds(first) == pytest.approx(-0.05 * 65)
    assert main(["prune", "--run", str(out), "--no-progress", "--levels", "0.5"]) == 0
    assert main(["report", "--run", str(out)]) == 0
    assert "spike-and-slab (prior log-odds -0.05 per parameter)" in (out / "report.md").read_text()


def test_fit_prices_parameters_per_example(tmp_path):
    """--price-per-example LAM: log-odds min(logit(0.1), -LAM N m), N the training images."""
    out = tmp_path / "run"
    argv = ["fit", "--model", "lenet_300_100", "--out", str(out), "--price-per-example", "1e-4",
            *QUICK]  # fmt: skip
    assert main(argv) == 0
    spec = json.loads((out / "run.json").read_text())["prior_spec"]
    assert spec["price_per_example"] == 1e-4 and "num_data" not in spec  # as the user gave it
    bnet = bp.load(out / "bayesian.safetensors", lenet_300_100(in_features=64))
    first = bnet.bayesian_layers["1"]  # 64 inputs and a bias per unit
    n = bnet.num_data
    assert first.prior.num_data == n and n > 0
    assert first.prior.log_odds(first) == pytest.approx(min(-math.log(9), -1e-4 * n * 65))
    assert main(["report", "--run", str(out)]) == 0
    assert (
        "(prior inclusion 0.1, at least 0.0001 x N nats per parameter)"
        in (out / "report.md").read_text()
    )


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_fit_with_user_weights(tmp_path, suffix):
    torch.manual_seed(1)
    net = lenet_300_100(in_features=64)
    path = tmp_path / f"mine{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": net.state_dict(), "epoch": 3}, path)
    else:
        from safetensors.torch import save_file

        save_file(net.state_dict(), str(path))
    out = tmp_path / "run"
    argv = ["fit", "--model", "lenet_300_100", "--weights", str(path), "--out", str(out), *QUICK]
    assert main(argv) == 0
    from safetensors.torch import load_file

    dense = load_file(str(out / "dense.safetensors"))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(dense[k], v)  # the user's weights, not retrained
    assert json.loads((out / "run.json").read_text())["weights"] == str(path)


def test_user_weights_from_an_old_checkpoint_keep_their_module_versions(tmp_path):
    # a BatchNorm saved before num_batches_tracked existed (version 1): its loader fills the key
    # in, but only if the checkpoint's own versions reach it
    from bayesprune.cli import load_weights

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    state = net.state_dict()
    del state["1.num_batches_tracked"]
    state._metadata["1"]["version"] = 1
    torch.save(state, tmp_path / "old.pt")
    fresh = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    load_weights(fresh, tmp_path / "old.pt", "mynet")
    torch.testing.assert_close(fresh[1].running_var, net[1].running_var)


def test_prune_threshold_zero_is_not_the_default(run_dir, tmp_path):
    out = tmp_path / "t0"
    assert main(["prune", "--run", str(run_dir), "--threshold", "0", "--levels", "0.5",
                 "--no-progress", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "compression.json").read_text())["threshold"] == 0.0


def test_fit_and_prune_your_own_builder(tmp_path, monkeypatch):
    (tmp_path / "my_nets_cli_test.py").write_text(
        "from torch import nn\n"
        "def build(in_features=784, num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.BatchNorm1d(32),\n"
        "                         nn.ReLU(),\n"
        "                         nn.Linear(32, num_classes))\n"
        "def not_a_net(**kwargs):\n"
        "    return 42\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["fit", "--model", "my_nets_cli_test:build", "--out", str(out), *QUICK]) == 0
    prune = ["prune", "--run", str(out), "--keep", "0.3", "--no-progress", "--levels", "0.5"]
    assert main([*prune, "--round-to", "8", "--recalibrate-batches", "2"]) == 0
    from my_nets_cli_test import build

    small = bp.load_pruned(out / "pruned.safetensors", lambda: build(in_features=64))
    assert small[1].out_features < 32 and small[1].out_features % 8 == 0
    assert main(["fit", "--model", "my_nets_cli_test:not_a_net", "--out", str(out), *QUICK]) == 2
    assert main(["fit", "--model", "my_nets_cli_test:nope", "--out", str(out), *QUICK]) == 2


def test_bad_paths(tmp_path, capsys, run_dir):
    fit = ["fit", "--model", "lenet_300_100", "--out", str(tmp_path / "o"), *QUICK]
    _one_line_error(capsys, [*fit, "--weights", str(tmp_path / "nope.pt")], "does not exist")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _one_line_error(capsys, [*fit, "--weights", str(bad)], "is not a state_dict")
    module = tmp_path / "module.pt"
    torch.save(lenet_300_100(in_features=64), module)  # a pickled module: refused
    _one_line_error(capsys, [*fit, "--weights", str(module)], "weights_only")
    wrong = tmp_path / "wrong.pt"
    torch.save(lenet_300_100(in_features=784).state_dict(), wrong)  # shapes for 28x28 input
    _one_line_error(capsys, [*fit, "--weights", str(wrong)], "does not match lenet_300_100")
    _one_line_error(capsys, ["prune", "--run", str(tmp_path / "none")], "does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "run.json").write_text('{"model": "lenet_300_100"}')
    _one_line_error(capsys, ["prune", "--run", str(tmp_path / "partial")], "lacks data, seed")
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(run_dir, damaged)
    (damaged / "bayesian.safetensors").write_bytes(b"\x00" * 100)
    _one_line_error(capsys, ["prune", "--run", str(damaged), "--no-progress"], "not a readable")
    _one_line_error(capsys, ["certify", "--run", str(tmp_path / "empty")], "not a run directory")
    _one_line_error(capsys, ["report", "--run", str(tmp_path / "empty")], "not a run directory")


def test_bad_options(tmp_path, capsys, run_dir):
    out = str(tmp_path / "o")
    _one_line_error(capsys, ["fit", "--model", "alexnet", "--out", out], "unknown model 'alexnet'")
    _one_line_error(capsys, ["fit", "--model", "no_such_module_xyz:build", "--out", out, *QUICK],
                    "cannot import 'no_such_module_xyz'")  # fmt: skip
    _one_line_error(capsys, ["fit", "--model", "lenet_300_100"], "--out")
    _one_line_error(capsys, ["fit", "--model", "lenet_300_100", "--out", out, "--epochs", "0"],
                    "positive integer")  # fmt: skip
    _one_line_error(capsys, ["fit", "--model", "lenet5_caffe", "--out", out, *QUICK],
                    "does not fit inputs of shape (1, 8, 8)")  # fmt: skip
    fit = ["fit", "--model", "lenet_300_100", "--out", out]
    _one_line_error(capsys, [*fit, "--global-scale", "0.1"], "--prior horseshoe")
    _one_line_error(capsys, [*fit, "--prior", "horseshoe", "--prior-inclusion", "0.1"],
                    "--prior spike-and-slab")  # fmt: skip
    _one_line_error(capsys, [*fit, "--prior-inclusion", "1"], "(0, 1)")
    _one_line_error(capsys, [*fit, "--prior-log-odds", "nan"], "a finite number")
    _one_line_error(capsys, [*fit, "--prior-inclusion", "0.01", "--prior-log-odds", "-900"],
                    "not both")  # fmt: skip
    _one_line_error(capsys, [*fit, "--prior", "horseshoe", "--prior-log-odds", "-900"],
                    "--prior spike-and-slab")  # fmt: skip
    _one_line_error(capsys, [*fit, "--per-parameter"], "add --prior-log-odds")
    _one_line_error(capsys, [*fit, "--prior-log-odds", "-1", "--per-parameter",
                             "--price-per-example", "1e-5"], "give one")  # fmt: skip
    _one_line_error(capsys, [*fit, "--prior", "horseshoe", "--price-per-example", "1e-5"],
                    "--prior spike-and-slab")  # fmt: skip
    _one_line_error(capsys, [*fit, "--price-per-example", "-1"], "a finite number >= 0")
    _one_line_error(capsys, [*fit, "--prior", "horseshoe", "--price-per-example", "0"],
                    "--prior spike-and-slab")  # fmt: skip
    _one_line_error(capsys, [*fit, "--prior", "horseshoe", "--per-parameter"],
                    "--prior spike-and-slab")  # fmt: skip
    _one_line_error(capsys, [*fit, "--kl-weight", "0"], "positive")
    _one_line_error(capsys, [*fit, "--structure-delay", "1"], "[0, 1)")
    _one_line_error(capsys, ["certify", "--run", str(run_dir), "--alpha", "1.5"], "(0, 1)")
    _one_line_error(capsys, ["prune", "--run", str(run_dir), "--threshold", "0.5",
                             "--keep", "0.3"], "not allowed with")  # fmt: skip
    _one_line_error(capsys, ["prune", "--run", str(run_dir), "--finetune-epochs", "-1"], ">= 0")
    _one_line_error(capsys, ["prune", "--run", str(run_dir), "--min-nodes", "-1"], ">= 0")
    _one_line_error(capsys, ["prune", "--run", str(run_dir), "--round-to", "0"], "positive")
    _one_line_error(capsys, ["prune", "--run", str(run_dir), "--recalibrate-batches", "2",
                             "--no-progress"], "no BatchNorm layer")  # fmt: skip
    _one_line_error(capsys, ["prune", "--run", str(run_dir), "--levels", "a,b"],
                    "comma-separated")  # fmt: skip
    # checked before anything is pruned or written: the run directory stays as it was
    before = (run_dir / "pruned.safetensors").read_bytes()
    _one_line_error(capsys, ["prune", "--run", str(run_dir), "--keep", "0.9", "--levels", "0,0.5"],
                    "fractions in (0, 1]")  # fmt: skip
    assert (run_dir / "pruned.safetensors").read_bytes() == before
    _one_line_error(capsys, ["certify", "--run", str(run_dir), "--levels", "0.5,2"],
                    "PIP thresholds in [0, 1]")  # fmt: skip
    _one_line_error(capsys, ["frobnicate"], "invalid choice")


@pytest.mark.fmnist
def test_fit_and_prune_on_fashion_mnist_subset(tmp_path, fmnist_available):
    out = tmp_path / "run"
    argv = ["fit", "--model", "lenet_300_100", "--data", "fashion-mnist", "--subset", "256",
            "--out", str(out), *QUICK]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "run.json").read_text())["input_shape"] == [1, 28, 28]
    assert (
        main(["prune", "--run", str(out), "--keep", "0.5", "--no-progress", "--levels", "0.5"]) == 0
    )
    small = bp.load_pruned(out / "pruned.safetensors", lenet_300_100)
    bnet = bp.load(out / "bayesian.safetensors", lenet_300_100())
    direct = bp.prune(bnet, keep=0.5)  # what the command should have done
    assert [small[i].out_features for i in (1, 3)] == [direct[i].out_features for i in (1, 3)]
    assert small[1].out_features + small[3].out_features < 400


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["prune", "--run", str(tmp_path / "none"), "--debug"])


def test_subset_shrinks_the_training_and_test_splits_as_its_help_says():
    from bayesprune.cli import load_splits

    splits = load_splits("digits", 50, seed=0, root=None)
    assert len(splits.train) == len(splits.test) == 50


def test_fit_uses_the_default_prior_and_price_per_example_0_drops_its_price(tmp_path):
    """Without size options, fit's prior is bp.priors.default_prior(); 0 turns its price off."""
    runs = {}
    for name, extra in (("default", []), ("off", ["--price-per-example", "0"])):
        out = tmp_path / name
        assert main(["fit", "--model", "lenet_300_100", "--out", str(out), *extra, *QUICK]) == 0
        runs[name] = json.loads((out / "run.json").read_text())["prior_spec"]
        assert main(["report", "--run", str(out)]) == 0
        runs[name + " report"] = (out / "report.md").read_text()
    assert runs["default"]["price_per_example"] == bp.priors.DEFAULT_PRICE_PER_EXAMPLE
    assert "(prior inclusion 0.1, at least 2e-06 x N nats per parameter)" in runs["default report"]
    assert runs["off"].get("price_per_example") is None
    assert "(prior inclusion 0.1)" in runs["off report"]
