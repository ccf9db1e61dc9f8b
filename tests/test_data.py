import gzip
import struct

import numpy as np
import pytest
import torch

from bayesprune.data import (
    DatasetNotFoundError,
    fashion_mnist_root,
    load_digits,
    load_fashion_mnist,
    loader,
    planted_teacher,
    read_idx,
    split_indices,
)


def _write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_fmnist(root, n_train=40, n_test=10) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(
            root / f"{split}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n).astype(np.uint8))


def test_batch_xy_names_what_came_instead_of_a_pair():
    from bayesprune.data import batch_xy

    x, y = batch_xy([torch.zeros(2, 3), [1, 0]])
    assert y.dtype == torch.long and y.tolist() == [1, 0]
    with pytest.raises(TypeError, match=r"cal_loader must yield.*dict with keys \['image'\]"):
        batch_xy({"image": torch.zeros(2)}, "cal_loader")
    with pytest.raises(TypeError, match="got 3 items per batch"):
        batch_xy((x, y, y))
    with pytest.raises(TypeError, match="got a Tensor"):
        batch_xy(torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"inputs that are a list, not a torch\.Tensor"):
        batch_xy(([0.0, 1.0], y))


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    _write_idx(tmp_path / "b", a, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), a)
    b = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    _write_idx(tmp_path / "c", b, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "c"), b)


def test_corrupted_idx_files_give_clear_errors(tmp_path):
    a = np.zeros((2, 3), dtype=np.uint8)
    _write_idx(tmp_path / "ok", a, compress=False)
    raw = (tmp_path / "ok").read_bytes()
    (tmp_path / "truncated").write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="corrupted"):
        read_idx(tmp_path / "truncated")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "bad.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(ValueError, match="not a readable IDX"):
        read_idx(tmp_path / "bad.gz")


def test_missing_dataset_names_package_and_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("BAYESPRUNE_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        fashion_mnist_root(tmp_path / "nowhere")
    assert "BAYESPRUNE_DATA" in str(err.value)
    monkeypatch.setenv("BAYESPRUNE_DATA", str(tmp_path / "wrong-root"))
    with pytest.raises(DatasetNotFoundError, match="environment variable BAYESPRUNE_DATA"):
        load_fashion_mnist()


def test_fashion_mnist_from_user_root_and_env(tmp_path, monkeypatch):
    _fake_fmnist(tmp_path)
    splits = load_fashion_mnist(tmp_path, val_size=5, cal_size=5)
    assert splits.sizes() == {"train": 30, "val": 5, "cal": 5, "test": 10}
    assert splits.train.tensors[0].shape[1:] == (1, 28, 28)
    monkeypatch.setenv("BAYESPRUNE_DATA", str(tmp_path))
    flat = load_fashion_mnist(val_size=5, cal_size=5, flatten=True)
    assert flat.train.tensors[0].shape[1:] == (784,)
    torch.testing.assert_close(flat.train.tensors[0], splits.train.tensors[0].flatten(1))


def test_corrupted_fashion_mnist_file(tmp_path):
    _fake_fmnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-3])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz is corrupted"):
        load_fashion_mnist(tmp_path, val_size=5, cal_size=5)


def test_splits_are_disjoint_deterministic_and_seeded():
    parts = split_indices(100, (0.2, 0.3, 0.5), seed=3)
    assert [len(p) for p in parts] == [20, 30, 50]
    assert len(np.unique(np.concatenate(parts))) == 100
    again = split_indices(100, (0.2, 0.3, 0.5), seed=3)
    other = split_indices(100, (0.2, 0.3, 0.5), seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[0], other[0])
    with pytest.raises(ValueError, match="sum to at most 1"):
        split_indices(10, (0.6, 0.6))


def test_digits_splits():
    s = load_digits(seed=0)
    assert sum(s.sizes().values()) == 1797
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.cal.tensors[0], s.test.tensors[0]])
    assert x.shape[1:] == (1, 8, 8)
    # disjoint: no image appears in two splits (digits has a few exact duplicates, so compare rows)
    assert len(torch.unique(x.flatten(1), dim=0)) >= 1797 - 5
    xb, yb = next(iter(loader(s.train, batch_size=16)))
    assert xb.shape == (16, 1, 8, 8) and yb.dtype == torch.long
    with pytest.raises(ValueError, match="four numbers"):
        load_digits(fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="batch_size"):
        loader(s.train, batch_size=0)


@pytest.mark.fmnist
def test_real_fashion_mnist(fmnist_available):
    s = load_fashion_mnist(seed=0)
    assert s.sizes() == {"train": 50000, "val": 5000, "cal": 5000, "test": 10000}
    x, y = s.train.tensors
    assert x.shape[1:] == (1, 28, 28) and int(y.min()) == 0 and int(y.max()) == 9
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    # the calibration split is disjoint from training
    cal = s.cal.tensors[0].flatten(1)[:200]
    train = x.flatten(1)
    dup = (torch.cdist(cal, train[:20000]) < 1e-6).any()
    assert not dup


def test_planted_teacher_is_deterministic_and_only_its_first_units_matter() -> None:
    a, b = planted_teacher(seed=1, n=50), planted_teacher(seed=1, n=50)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.relevant == 3 and a.student[0].out_features == 12
    # the student starts near the teacher: its relevant units carry the output
    w_out = a.student[2].weight.detach().abs()[0]
    assert w_out[:3].min() > 5 * w_out[3:].max()
    with pytest.raises(ValueError, match="relevant"):
        planted_teacher(relevant=0)
    with pytest.raises(ValueError, match="d must be"):
        planted_teacher(d=4)


def test_input_errors_names_the_input_and_lets_other_errors_through() -> None:
    from bayesprune.data import input_errors

    with pytest.raises(
        ValueError, match=r"running Linear on inputs of shape \(2, 3\) failed \(mat1"
    ):
        with input_errors("Linear", "inputs", (2, 3)):
            torch.nn.Linear(4, 1)(torch.zeros(2, 3))
    with pytest.raises(KeyError):  # not an input problem: passes through untouched
        with input_errors("Linear", "inputs", (2, 3)):
            raise KeyError("x")
    with pytest.raises(torch.OutOfMemoryError):
        with input_errors("Linear", "inputs", (2, 3)):
            raise torch.OutOfMemoryError("out of memory")


def test_examples_of_reads_tensors_datasets_and_loaders_and_names_bad_data() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from bayesprune.data import examples_of

    x, y = torch.randn(10, 3), torch.arange(10)
    for data in ((x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=4)):
        got_x, got_y = examples_of(data, 6)
        assert torch.equal(got_x, x[:6]) and torch.equal(got_y, y[:6])
    with pytest.raises(ValueError, match="data is empty"):
        examples_of([])
    with pytest.raises(ValueError, match="data is empty"):
        examples_of((torch.zeros(0, 3), torch.zeros(0)))
    with pytest.raises(TypeError, match="a TensorDataset or a DataLoader, got int"):
        examples_of(3)
    with pytest.raises(TypeError, match="must yield \\(inputs, labels\\) pairs"):
        examples_of([{"x": x}])
