"""Faults of the ``bayesprune`` command: interrupts, full disks, read-only and odd targets, stale
run directories. Each leaves one line on stderr, the right exit status, and a run directory that
every later command either uses correctly or refuses."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune import files
from bayesprune.cli import OUTPUTS, main

QUICK = ["--epochs", "1", "--pretrain-epochs", "1", "--no-progress", "--threads", "1"]
FIT = ["fit", "--model", "lenet_300_100", "--data", "digits"]


def _error_line(capsys, status: int) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("bayesprune"), err
    return err


def _no_temporaries(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*.tmp")]
    assert not left, left


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished run: fit, prune and certify (digits, one epoch each)."""
    out = tmp_path_factory.mktemp("done")
    assert main([*FIT, "--out", str(out), *QUICK]) == 0
    assert main(["prune", "--run", str(out), "--no-progress", "--levels", "0.5"]) == 0
    assert main(["certify", "--run", str(out), "--alpha", "0.2", "--no-progress"]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------------------------------------------------------
# interrupts
# ------------------------------------------------------------------------------------------------


def test_ctrl_c_during_fit_leaves_no_run_and_later_commands_refuse(done, tmp_path) -> None:
    run = _copy(done, tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bayesprune.cli", *FIT, "--out", str(run), "--epochs", "500",
           "--pretrain-epochs", "1", "--no-progress", "--threads", "1"]  # fmt: skip
    # SIGINT at its default in the child: a shell's background job (pytest ... &) ignores it, and a
    # child started from there would inherit that and run the whole fit
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until SVI runs: the old run has been moved away by then
        if line.startswith("2/3") or time.time() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bayesprune: interrupted"), err
    assert not (run / "run.json").exists()
    _no_temporaries(run)
    # the previous run's files were retired, not mixed with the new dense net
    retired = list((run / "retired").iterdir())
    assert len(retired) == 1 and (retired[0] / "run.json").is_file()
    assert (retired[0] / "certificate.json").is_file() and not (run / "certificate.json").exists()
    for command in ("prune", "certify", "report"):
        r = subprocess.run([sys.executable, "-m", "bayesprune.cli", command, "--run", str(run)],
                           capture_output=True, text=True, env=env)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "did not finish" in r.stderr


# ------------------------------------------------------------------------------------------------
# full disk, read-only target, odd targets
# ------------------------------------------------------------------------------------------------


def test_full_disk_during_fit(tmp_path, monkeypatch, capsys) -> None:
    real = files.os.fsync
    calls = {"n": 0}

    def full(fd):  # the disk fills up after fit.partial.json, at the next file flushed
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", full)
    monkeypatch.setattr("bayesprune.checkpoint.os.fsync", full)
    out = tmp_path / "run"
    assert main([*FIT, "--out", str(out), *QUICK]) == 2
    err = _error_line(capsys, 2)
    assert "No space left on device" in err and "cannot write" in err, err
    monkeypatch.setattr(files.os, "fsync", real)
    assert calls["n"] == 2
    assert not (out / "run.json").exists() and not (out / "fit.json").exists()
    _no_temporaries(out)
    assert main(["prune", "--run", str(out)]) == 2
    assert "did not finish" in _error_line(capsys, 2)


def test_full_disk_while_writing_safetensors(done, tmp_path, monkeypatch, capsys) -> None:
    run = _copy(done, tmp_path)
    import safetensors.torch

    def partial(state, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", partial)
    assert main(["prune", "--run", str(run), "--no-progress", "--levels", "0.5"]) == 2
    assert "No space left on device" in _error_line(capsys, 2)
    _no_temporaries(run)
    # the interrupted prune left no pruned net and no record; the fit is intact
    assert not (run / "pruned.safetensors").exists() and not (run / "compression.json").exists()
    assert (run / "run.json").is_file()
    monkeypatch.undo()
    assert main(["report", "--run", str(run)]) == 0
    assert "bayesprune prune --run" in (run / "report.md").read_text()  # says what is missing


def test_read_only_target(done, tmp_path, monkeypatch, capsys) -> None:
    run = _copy(done, tmp_path)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    assert main(["report", "--run", str(run)]) == 2
    assert "Read-only file system" in _error_line(capsys, 2)
    monkeypatch.undo()
    assert not (run / "report.md").exists()  # the fixture's run had no report: still none
    _no_temporaries(run)


def test_odd_targets_are_refused_and_left_alone(tmp_path) -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    bnet = bp.bayesianize(net)
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"keep me")
    link = tmp_path / "b.safetensors"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="symbolic link"):
        bnet.save(link)
    assert link.is_symlink() and target.read_bytes() == b"keep me"
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(FileExistsError, match="a folder"):
        bnet.save(tmp_path / "d.safetensors")
    with pytest.raises(FileExistsError, match="not a regular file"):
        files.check_target("/dev/null")
    with pytest.raises(FileNotFoundError, match="create it first"):
        bp.save_pruned(net, tmp_path / "nope" / "p.safetensors")
    _no_temporaries(tmp_path)


def test_file_modes_are_consistent(done) -> None:
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    for p in done.iterdir():
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == expected, p.name


# ------------------------------------------------------------------------------------------------
# stale and mixed run directories
# ------------------------------------------------------------------------------------------------


def test_refit_retires_the_old_run_and_report_refuses_foreign_files(done, tmp_path, capsys) -> None:
    run = _copy(done, tmp_path)
    old_id = json.loads((run / "run.json").read_text())["run_id"]
    for name in ("fit.json", "compression.json", "certificate.json", "conformal.json"):
        assert json.loads((run / name).read_text())["run_id"] == old_id
    assert main([*FIT, "--out", str(run), *QUICK]) == 0
    new_id = json.loads((run / "run.json").read_text())["run_id"]
    assert new_id != old_id
    for name in OUTPUTS["prune"] + OUTPUTS["certify"]:
        assert not (run / name).exists(), name  # the old pruning and certificate are retired
        assert (run / "retired" / old_id / name).exists(), name
    assert main(["report", "--run", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert new_id in text and "Certificate" not in text
    # a file of another fit copied in is refused in one line
    shutil.copy(done / "certificate.json", run / "certificate.json")
    assert main(["report", "--run", str(run)]) == 2
    err = _error_line(capsys, 2)
    assert "comes from another fit" in err and old_id in err and "certify --run" in err


def test_preprocessing_is_recorded_and_chosen(tmp_path) -> None:
    out = tmp_path / "unit"
    assert main([*FIT, "--out", str(out), "--preprocess", "unit", *QUICK]) == 0
    cfg = json.loads((out / "run.json").read_text())
    assert cfg["preprocess"] == "unit"
    from bayesprune.cli import Run

    x = Run(out, "cpu").splits.train.tensors[0]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0  # [0, 1], not standardised
    assert main(["report", "--run", str(out)]) == 0
    assert "--preprocess unit" in (out / "report.md").read_text()


def test_progress_bars_stay_off_without_a_terminal(tmp_path, capsys) -> None:
    out = tmp_path / "quiet"
    argv = [*FIT, "--out", str(out), "--epochs", "1", "--pretrain-epochs", "1", "--threads", "1"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    assert main([*argv, "--progress"]) == 0
    assert "fit (SVI)" in capsys.readouterr().err


def test_certify_states_the_dense_reference(done) -> None:
    cert = json.loads((done / "certificate.json").read_text())
    assert cert["reference_file"] == "dense.safetensors"
    assert 0 < cert["reference_test_accuracy"] <= 1 and 0 < cert["test_accuracy"] <= 1
    assert main(["report", "--run", str(done)]) == 0
    text = (done / "report.md").read_text()
    assert "relative to the run's dense network (dense.safetensors)" in text
    assert f"{cert['reference_test_accuracy']:.4f} | {cert['test_accuracy']:.4f}" in text
    assert torch.isfinite(torch.tensor(cert["test_accuracy"]))


def test_unreadable_weights_never_advise_weights_only_false(tmp_path, capsys) -> None:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(bytes(range(256)) * 8)  # the same bytes every run
    assert main([*FIT, "--out", str(tmp_path / "o"), "--weights", str(bad), *QUICK]) == 2
    err = _error_line(capsys, 2)
    assert "never unpickles" in err and "weights_only=False" not in err and "False" not in err


def test_ignored_labels_are_named(tmp_path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.full((16,), -100)), batch_size=8)
    with pytest.raises(ValueError, match="ignore_index"):
        bp.train(net, data, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"ignore_index.*drop the unlabelled examples"):
        bp.fit(bp.bayesianize(net), data, epochs=1, progress=False)


def test_an_interrupted_fit_resumes_to_the_same_result(tmp_path, monkeypatch, capsys) -> None:
    from safetensors.torch import load_file

    from bayesprune import checkpoint

    # --price-per-example 0: the prior of the versions before the price was the default
    argv = [*FIT, "--epochs", "3", "--pretrain-epochs", "1", "--no-progress", "--threads", "1",
            "--price-per-example", "0"]  # fmt: skip
    straight = tmp_path / "straight"
    assert main([*argv, "--out", str(straight)]) == 0
    run = tmp_path / "run"
    real, calls = checkpoint.save_fit_state, []

    def then_ctrl_c(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # right after the state of epoch 1 is on disk

    monkeypatch.setattr(checkpoint, "save_fit_state", then_ctrl_c)
    assert main([*argv, "--out", str(run)]) == 130
    assert "--resume" in _error_line(capsys, 130)
    monkeypatch.undo()
    assert not (run / "run.json").exists()
    assert main(["prune", "--run", str(run)]) == 2
    assert "--resume" in _error_line(capsys, 2)
    assert main([*argv, "--out", str(run), "--lr", "0.01", "--resume"]) == 2  # other options
    assert "--lr 0.001 then, 0.01 now" in _error_line(capsys, 2)
    partial = run / "fit.partial.json"  # as from a version before these options: they were off
    saved = json.loads(partial.read_text())
    del saved["options"]["per_parameter"], saved["options"]["price_per_example"]
    partial.write_text(json.dumps(saved))
    without = [a for a in argv if a not in ("--price-per-example", "0")]
    assert main([*without, "--out", str(run), "--resume"]) == 2  # the default has a price now
    assert "add --price-per-example 0" in _error_line(capsys, 2)
    assert main([*argv, "--out", str(run), "--resume"]) == 0
    a, b = load_file(straight / "bayesian.safetensors"), load_file(run / "bayesian.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (run / "checkpoint.safetensors.resume").exists()  # finished: nothing to resume
    assert main([*argv, "--out", str(run), "--resume"]) == 2
    assert "nothing to resume" in _error_line(capsys, 2)


def test_the_cli_never_moves_or_removes_files_it_did_not_write(done, tmp_path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own notes")
    assert main([*FIT, "--out", str(mine), *QUICK]) == 2
    assert "not a bayesprune run directory" in _error_line(capsys, 2)
    assert (mine / "report.md").read_text() == "my own notes"
    other = tmp_path / "other"
    other.mkdir()
    (other / "pruned.safetensors").write_bytes(b"someone else's")
    assert main(["prune", "--run", str(done), "--out", str(other), "--levels", "0.5"]) == 2
    assert "did not write" in _error_line(capsys, 2)
    assert (other / "pruned.safetensors").read_bytes() == b"someone else's"
    (other / "pruned.safetensors").unlink()
    (other / "pruned.safetensors").symlink_to(tmp_path / "target")
    assert main(["prune", "--run", str(done), "--out", str(other), "--levels", "0.5"]) == 2
    assert "it is a link" in _error_line(capsys, 2)


def test_a_replaced_file_keeps_its_mode(tmp_path) -> None:
    path = tmp_path / "private.json"
    path.write_text("{}")
    path.chmod(0o600)
    files.write_json(path, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and json.loads(path.read_text()) == {"a": 1}
