"""Fit checkpoints: resume= continues a stopped fit bit-identically, seed= repeats a fit on the
same loader, the checks of resume=, and atomic checkpoint writes."""

from __future__ import annotations

import os

import pyro
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import bayesprune as bp
import bayesprune.checkpoint as ckpt
from bayesprune.bayesianize import BayesianModule

# short fits on noise do not separate the nodes; that warning is not what these tests are about
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*inclusion probabilities:UserWarning"),
    pytest.mark.filterwarnings("ignore:the median-probability model:UserWarning"),
]

PRIORS = {
    "spike_and_slab": None,
    "group_horseshoe": bp.priors.GroupHorseshoe(),
    # its prior depends on the fit's N (a checkpoint records it; a fresh module does not)
    "price_per_example": bp.priors.SpikeAndSlab(price_per_example=1e-3),
}


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(96, 64, generator=g), torch.randint(0, 10, (96,), generator=g))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _bnet(net: nn.Module, prior: str = "spike_and_slab") -> BayesianModule:
    return (
        bp.bayesianize(net) if PRIORS[prior] is None else bp.bayesianize(net, prior=PRIORS[prior])
    )


def _loader(kind: str) -> DataLoader:
    """A shuffling loader: its sampler draws from torch's global generator, or from its own."""
    if kind == "shuffle":
        return DataLoader(_data(), batch_size=16, shuffle=True)
    if kind == "own_generator":
        return bp.data.loader(_data(), batch_size=16, seed=5)
    assert kind == "sampler_generator"
    data = _data()
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(7))
    return DataLoader(data, batch_size=16, sampler=sampler)


class StopAfter:
    """``loader``, with a Ctrl-C at the start of pass ``epochs + 1``."""

    def __init__(self, loader: DataLoader, epochs: int) -> None:
        self.loader, self.epochs, self.passes = loader, epochs, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __iter__(self):
        self.passes += 1
        if self.passes > self.epochs:
            raise KeyboardInterrupt
        return iter(self.loader)


def _stopped_fit(path, epochs: int = 4, stop: int = 2, **kw) -> bp.FitResult:
    """A fit of ``epochs`` epochs with ``checkpoint=path``, stopped by Ctrl-C after ``stop``."""
    with pytest.raises(KeyboardInterrupt) as info:
        bp.fit(_bnet(_net()), StopAfter(_loader("shuffle"), stop), epochs=epochs, checkpoint=path,
               progress=False, seed=0, **kw)  # fmt: skip
    return info.value.fit_result


def _assert_same(a: BayesianModule, b: BayesianModule, ra: bp.FitResult, rb: bp.FitResult) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [
        k for k in sa if not torch.equal(sa[k], sb[k])
    ]
    for name in (
        "loss",
        "epoch_loss",
        "kl",
        "nll",
        "val_accuracy",
        "val_median_accuracy",
        "nodes_off",
    ):
        assert getattr(ra, name) == getattr(rb, name), name


# -- resume continues exactly ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prior", "kind"),
    [
        ("spike_and_slab", "shuffle"),
        ("group_horseshoe", "shuffle"),
        ("spike_and_slab", "own_generator"),
        ("price_per_example", "shuffle"),
    ],
)
def test_a_stopped_and_resumed_fit_ends_bit_identical_to_a_straight_fit(
    tmp_path, prior, kind
) -> None:
    net = _net()
    val = DataLoader(_data(), batch_size=48)
    kw = {"epochs": 4, "val_loader": val, "progress": False}
    straight = _bnet(net, prior)
    assert (
        straight.gate_parameters() if prior != "group_horseshoe" else not straight.gate_parameters()
    )
    r_straight = bp.fit(straight, _loader(kind), seed=0, **kw)

    path = tmp_path / "ckpt.safetensors"
    stopped = _bnet(net, prior)
    with pytest.raises(KeyboardInterrupt) as info:
        bp.fit(stopped, StopAfter(_loader(kind), 2), seed=0, checkpoint=path, **kw)
    partial = info.value.fit_result  # the history is not lost on Ctrl-C
    assert len(partial.epoch_loss) == 2 and partial.loss == r_straight.loss[:12]
    assert "continues from the end of epoch 2" in " ".join(info.value.__notes__)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors", "ckpt.safetensors.resume"]
    saved = bp.load(path, net)  # the module file keeps the format of bnet.save
    assert all(torch.equal(v, stopped.state_dict()[k]) for k, v in saved.state_dict().items())

    # a fresh module and a fresh loader, as in a new Python session
    resumed = _bnet(net, prior)
    r_resumed = bp.fit(resumed, _loader(kind), resume=path, checkpoint=path, **kw)
    _assert_same(straight, resumed, r_straight, r_resumed)
    assert r_resumed.seconds >= partial.seconds


def test_resume_carries_on_the_structure_freeze_and_the_schedule(tmp_path) -> None:
    """The structure parameters are frozen for epochs 1-2 (half the steps). Stopped after epoch 1,
    the checkpoint holds the freeze half done, and the resumed fit frees them at the start of
    epoch 3, as the straight fit does, not a freeze's length after the restart."""
    path = tmp_path / "ckpt.safetensors"
    kw = {"epochs": 4, "structure_delay": 0.5, "progress": False}
    straight = _bnet(_net())
    r_straight = bp.fit(straight, _loader("shuffle"), seed=0, **kw)
    _stopped_fit(path, stop=1, structure_delay=0.5)
    state = ckpt.load_fit_state(path)["state"]
    assert state["epoch"] == 1 and state["step"] == 6
    assert state["gate_optimizer"]["param_groups"][0]["lr"] == 0.0  # still frozen
    resumed = _bnet(_net())
    r_resumed = bp.fit(resumed, _loader("shuffle"), resume=path, **kw)
    _assert_same(straight, resumed, r_straight, r_resumed)


# -- seed= ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["shuffle", "own_generator", "sampler_generator"])
def test_a_seeded_fit_twice_on_the_same_loader_is_identical(kind) -> None:
    net, loader = _net(), _loader(kind)
    a, b = _bnet(net), _bnet(net)
    ra = bp.fit(a, loader, epochs=2, seed=3, progress=False)
    torch.manual_seed(123)  # the global state in between does not matter
    rb = bp.fit(b, loader, epochs=2, seed=3, progress=False)
    _assert_same(a, b, ra, rb)


def test_seed_reseeds_the_loaders_own_generator_with_seed() -> None:
    loader = _loader("own_generator")
    bp.fit(_bnet(_net()), loader, epochs=1, seed=11, progress=False)
    after = loader.generator.get_state()
    loader.generator.manual_seed(11)
    for _ in loader:  # the one pass of the fit, from seed 11
        pass
    assert torch.equal(after, loader.generator.get_state())


# -- what resume= refuses -------------------------------------------------------------------------
def test_resume_names_the_options_that_differ(tmp_path) -> None:
    path = tmp_path / "ckpt.safetensors"
    _stopped_fit(path, stop=1)
    bnet = _bnet(_net())
    before = {k: v.clone() for k, v in bnet.state_dict().items()}
    loader = _loader("shuffle")
    with pytest.raises(ValueError, match=r"epochs=4 in the checkpoint, 5 now") as info:
        bp.fit(bnet, loader, epochs=5, resume=path, progress=False)
    assert str(info.value).count(" in the checkpoint, ") == 1  # only what differs
    with pytest.raises(
        ValueError, match=r"epochs=4 in the checkpoint, 6 now; lr=0.001 in the checkpoint, 0.01 now"
    ):
        bp.fit(bnet, loader, epochs=6, lr=1e-2, resume=path, progress=False)
    with pytest.raises(ValueError, match=r"gate_step=0.01 in the checkpoint, 0.1 now"):
        bp.fit(bnet, loader, epochs=4, gate_step=0.1, resume=path, progress=False)
    with pytest.raises(ValueError, match=r"batches_per_epoch=6 in the checkpoint, 3 now"):
        bp.fit(
            bnet,
            DataLoader(_data(), batch_size=32, shuffle=True),
            epochs=4,
            resume=path,
            progress=False,
        )
    with pytest.raises(ValueError, match=r"seed=0 in the checkpoint, 1 now"):
        bp.fit(bnet, loader, epochs=4, seed=1, resume=path, progress=False)
    with pytest.raises(ValueError, match=r"val_loader=False in the checkpoint, True now"):
        bp.fit(bnet, loader, epochs=4, val_loader=loader, resume=path, progress=False)
    with pytest.raises(ValueError, match="not built like the module in the checkpoint"):
        bp.fit(_bnet(_net(), "group_horseshoe"), loader, epochs=4, resume=path, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in bnet.state_dict().items())  # untouched


def test_resume_refuses_a_missing_file_or_one_that_is_not_a_fit_checkpoint(tmp_path) -> None:
    bnet, loader = _bnet(_net()), _loader("shuffle")
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(
        FileNotFoundError, match=r"no fit checkpoint at .*ckpt\.safetensors\.resume"
    ):
        bp.fit(bnet, loader, epochs=2, resume=path, progress=False)
    bnet.save(path)  # a module file alone cannot be continued
    with pytest.raises(
        FileNotFoundError, match=r"its fit state ckpt\.safetensors\.resume does not"
    ):
        bp.fit(bnet, loader, epochs=2, resume=path, progress=False)
    other = tmp_path / "other.resume"
    bnet.save(other)
    with pytest.raises(ValueError, match="not a bayesprune fit checkpoint"):
        bp.fit(bnet, loader, epochs=2, resume=other, progress=False)
    other.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        bp.fit(bnet, loader, epochs=2, resume=other, progress=False)
    with pytest.raises(ValueError, match=r"ends in '\.resume'.*name the module file"):
        bp.fit(bnet, loader, epochs=2, checkpoint=other, progress=False)


def test_resume_refuses_a_finished_fit_and_a_custom_elbo(tmp_path) -> None:
    path = tmp_path / "ckpt.safetensors"
    bp.fit(_bnet(_net()), _loader("shuffle"), epochs=2, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match=r"finished fit \(all 2 epochs\)"):
        bp.fit(_bnet(_net()), _loader("shuffle"), epochs=2, resume=path, progress=False)
    with pytest.raises(ValueError, match=r"default fit only \(elbo=None\)"):
        bp.fit(_bnet(_net()), _loader("shuffle"), epochs=2, resume=path, progress=False,
               elbo=pyro.infer.Trace_ELBO())  # fmt: skip


# -- atomic writes --------------------------------------------------------------------------------
def test_a_failed_checkpoint_write_leaves_the_previous_files_whole_and_no_partial_file(
    tmp_path, monkeypatch
) -> None:
    path = tmp_path / "ckpt.safetensors"
    write_bytes, calls = ckpt._write_bytes, []

    def disk_full(tmp: str, data: bytes) -> None:
        calls.append(tmp)
        if len(calls) == 2:  # the fit state of epoch 2: half written, then the disk is full
            write_bytes(tmp, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        write_bytes(tmp, data)

    monkeypatch.setattr(ckpt, "_write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left") as info:
        bp.fit(_bnet(_net()), _loader("shuffle"), epochs=3, seed=0, checkpoint=path, progress=False)
    assert len(info.value.fit_result.epoch_loss) == 2
    assert "continues from the end of epoch 1" in " ".join(info.value.__notes__)
    assert os.path.dirname(calls[1]) == str(tmp_path)  # the temporary file was next to the target
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors", "ckpt.safetensors.resume"]
    assert ckpt.load_fit_state(path)["state"]["epoch"] == 1
    monkeypatch.undo()

    def half_module(self, file) -> None:
        with open(file, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BayesianModule, "save", half_module)
    with pytest.raises(OSError, match="No space left"):
        bp.fit(
            _bnet(_net()),
            _loader("shuffle"),
            epochs=3,
            resume=path,
            checkpoint=path,
            progress=False,
        )
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors", "ckpt.safetensors.resume"]
    assert bp.load(path, _net()).num_data == 96  # the epoch-1 module file, whole
    # the fit state of epoch 2 was written before the module failed: the fit goes on from it
    assert ckpt.load_fit_state(path)["state"]["epoch"] == 2
    result = bp.fit(_bnet(_net()), _loader("shuffle"), epochs=3, resume=path, progress=False)
    assert len(result.epoch_loss) == 3
