"""Datasets and deterministic splits, and the contract of a batch: what goes into a network and
what comes out (``batch_xy``, ``input_errors``, ``output_tensor``).

Two real datasets, both available offline:

* **Fashion-MNIST** read from the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), or from a directory given as ``root=`` or in the
  ``BAYESPRUNE_DATA`` environment variable. Nothing is ever downloaded.
* **scikit-learn's 8x8 digits** (1,797 images bundled with scikit-learn), small enough for tests.

Every loader returns a :class:`Splits` of four disjoint :class:`torch.utils.data.TensorDataset`
objects: ``train``, ``val``, ``cal`` (calibration, for the conformal layer: training never sees it)
and ``test``. The split is a pure function of the seed.

Example
-------
>>> from bayesprune.data import load_digits, loader
>>> splits = load_digits(seed=0)
>>> len(splits.train) + len(splits.val) + len(splits.cal) + len(splits.test)
1797
>>> xb, yb = next(iter(loader(splits.train, batch_size=32)))
>>> tuple(xb.shape)
(32, 1, 8, 8)
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "DatasetNotFoundError",
    "PlantedTeacher",
    "Splits",
    "batch_xy",
    "check_finite",
    "examples_of",
    "fashion_mnist_root",
    "input_errors",
    "load_digits",
    "load_fashion_mnist",
    "loader",
    "output_tensor",
    "planted_teacher",
    "read_idx",
    "split_indices",
]

DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "BAYESPRUNE_DATA"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Normalisation constants of the Fashion-MNIST training images (pixel values in [0, 1]).
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where it was looked for. The message says how to install or point to it."""


@dataclass(frozen=True)
class Splits:
    """Four disjoint splits of one dataset.

    ``cal`` is the calibration split of the conformal layer; training must never see it.
    """

    train: TensorDataset
    val: TensorDataset
    cal: TensorDataset
    test: TensorDataset
    num_classes: int

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "val", "cal", "test")}


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """Return the directory holding the Fashion-MNIST IDX files.

    Looked up in this order: the ``root`` argument, the ``BAYESPRUNE_DATA`` environment variable,
    then the Debian package's ``/usr/share/datasets/fashion-mnist``.

    Raises
    ------
    DatasetNotFoundError
        When the directory or one of its four files is missing.
    """
    source = "argument root"
    if root is None and os.environ.get(ENV_VAR):
        root, source = os.environ[ENV_VAR], f"environment variable {ENV_VAR}"
    if root is None:
        root, source = DEFAULT_FASHION_MNIST_ROOT, "the default location"
    path = Path(root)
    missing = [n for pair in _FILES.values() for n in pair if _find(path, n) is None]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {path} ({source}): missing {', '.join(missing)}. "
            "Install it with `apt-get install dataset-fashion-mnist` (files go to "
            f"{DEFAULT_FASHION_MNIST_ROOT}), or set {ENV_VAR} / pass root= to a directory "
            "holding the four IDX files (optionally .gz). bayesprune never downloads data."
        )
    return path


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a NumPy array.

    The IDX format is a 4-byte magic number ``0x0000TTDD`` (T: element type, D: number of
    dimensions), D big-endian uint32 sizes, then the data.

    Raises
    ------
    ValueError
        When the file is truncated, has a bad magic number, or its size does not match its header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise ValueError(
            f"{path} is not a readable IDX file ({exc}); re-install the dataset."
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number); re-install the dataset.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its header; re-install the dataset.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path} is corrupted: its header promises {shape} ({expected} bytes of data) but it "
            f"holds {len(raw) - header} bytes; re-install the dataset."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def split_indices(n: int, fractions: tuple[float, ...], seed: int = 0) -> list[np.ndarray]:
    """Split ``range(n)`` into disjoint random index arrays with the given fractions.

    The last part takes the remainder. The result depends only on ``n``, ``fractions`` and ``seed``.
    """
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be non-negative and sum to at most 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([round(f * n) for f in fractions[:-1]])
    return np.split(perm[: round(sum(fractions) * n)], bounds)


def _tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(
        torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    )


def load_fashion_mnist(
    root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    val_size: int = 5000,
    cal_size: int = 5000,
    subset: int | None = None,
    flatten: bool = False,
    normalize: bool = True,
) -> Splits:
    """Load Fashion-MNIST as deterministic train / val / cal / test splits.

    The official 60,000 training images are split into ``train``, ``val`` (``val_size``) and
    ``cal`` (``cal_size``) by ``seed``; ``test`` is the official 10,000-image test set.

    Parameters
    ----------
    root
        Directory of the IDX files; defaults to ``$BAYESPRUNE_DATA`` then the Debian package path.
    seed
        Seed of the train/val/cal split.
    val_size, cal_size
        Sizes of the validation and calibration splits taken from the official training set.
    subset
        Keep only this many training images (after the split) and as many test images, for quick runs.
    flatten
        Return images as 784-vectors instead of ``[1, 28, 28]``.
    normalize
        Standardise pixels with the training-set mean and standard deviation.

    Example
    -------
    >>> from bayesprune.data import load_fashion_mnist
    >>> splits = load_fashion_mnist(subset=1000)  # doctest: +SKIP
    >>> splits.sizes()  # doctest: +SKIP
    {'train': 1000, 'val': 5000, 'cal': 5000, 'test': 1000}
    """
    path = fashion_mnist_root(root)
    arrays = {}
    for split, (img_name, lbl_name) in _FILES.items():
        images = read_idx(_find(path, img_name))
        labels = read_idx(_find(path, lbl_name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {split} files in {path} disagree: images {images.shape}, labels "
                f"{labels.shape}; re-install the dataset."
            )
        x = images.astype(np.float32) / 255.0
        if normalize:
            x = (x - _FMNIST_MEAN) / _FMNIST_STD
        x = x.reshape(len(x), -1) if flatten else x[:, None]
        arrays[split] = (x, labels.astype(np.int64))
    x_all, y_all = arrays["train"]
    n = len(x_all)
    if val_size + cal_size >= n:
        raise ValueError(
            f"val_size + cal_size must leave training data (< {n}), got {val_size + cal_size}"
        )
    val_idx, cal_idx, train_idx = split_indices(
        n, (val_size / n, cal_size / n, 1 - (val_size + cal_size) / n), seed
    )
    x_test, y_test = arrays["test"]
    if subset is not None:
        train_idx = train_idx[:subset]
        x_test, y_test = x_test[:subset], y_test[:subset]
    return Splits(
        train=_tensor_dataset(x_all[train_idx], y_all[train_idx]),
        val=_tensor_dataset(x_all[val_idx], y_all[val_idx]),
        cal=_tensor_dataset(x_all[cal_idx], y_all[cal_idx]),
        test=_tensor_dataset(x_test, y_test),
        num_classes=10,
    )


def load_digits(
    *,
    seed: int = 0,
    fractions: tuple[float, float, float, float] = (0.5, 0.1, 0.2, 0.2),
    flatten: bool = False,
    normalize: bool = True,
) -> Splits:
    """Load scikit-learn's bundled 8x8 digits as deterministic train / val / cal / test splits.

    Pixels (0..16) are scaled to [0, 1] and, with ``normalize=True`` (default), standardised with
    the mean and sd of all pixels; images are ``[1, 8, 8]`` (or 64-vectors with ``flatten=True``). Requires scikit-learn (``pip install bayesprune[sklearn]``).

    Example
    -------
    >>> from bayesprune.data import load_digits
    >>> load_digits(seed=1).sizes()
    {'train': 898, 'val': 180, 'cal': 359, 'test': 360}
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits needs scikit-learn: `pip install bayesprune[sklearn]`."
        ) from exc
    if len(fractions) != 4 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(
            f"fractions must be four numbers summing to 1 (train, val, cal, test), got {fractions}"
        )
    bunch = _sk_load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    if normalize:
        x = (x - x.mean()) / x.std()
    x = x if flatten else x.reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train, val, cal, test = (
        _tensor_dataset(x[i], y[i]) for i in split_indices(len(x), fractions, seed)
    )
    return Splits(train=train, val=val, cal=cal, test=test, num_classes=10)


def batch_xy(batch: Any, what: str = "the loader") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(inputs, labels)`` of one minibatch, or a ``TypeError`` that says what came instead.

    Every function of bayesprune that reads labelled batches reads them through this, so a
    loader yielding dicts or ``(x, y, index)`` triples gets one clear message wherever it is used.

    Example
    -------
    >>> import torch
    >>> from bayesprune.data import batch_xy
    >>> x, y = batch_xy((torch.zeros(2, 3), [0, 1]))
    >>> y
    tensor([0, 1])
    >>> batch_xy({"image": torch.zeros(2, 3), "label": torch.zeros(2)}, "train_loader")
    Traceback (most recent call last):
    ...
    TypeError: train_loader must yield (inputs, labels) pairs; got a dict with keys ['image', 'label']. Wrap its dataset so that items are (x, y), e.g. a TensorDataset
    """
    how = "Wrap its dataset so that items are (x, y), e.g. a TensorDataset"
    if isinstance(batch, Mapping):
        raise TypeError(
            f"{what} must yield (inputs, labels) pairs; got a dict with keys {list(batch)}. {how}"
        )
    if not isinstance(batch, tuple | list):
        raise TypeError(
            f"{what} must yield (inputs, labels) pairs; got a {type(batch).__name__}. {how}"
        )
    if len(batch) != 2:
        raise TypeError(
            f"{what} must yield (inputs, labels) pairs; got {len(batch)} items per batch. {how}"
        )
    x, y = batch
    input_tensor(x, f"{what} yielded inputs that are")
    return x, torch.as_tensor(y)


def examples_of(data: Any, max_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` tensors from ``(inputs, labels)`` tensors, a ``TensorDataset`` or an iterable of
    batches (a loader: read only until ``max_examples`` are in), cut to ``max_examples``.

    Example
    -------
    >>> import torch
    >>> from bayesprune.data import examples_of
    >>> batches = [(torch.zeros(4, 3), torch.zeros(4)) for _ in range(3)]
    >>> [t.shape[0] for t in examples_of(batches, 6)]
    [6, 6]
    """
    if isinstance(data, tuple | list) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
    elif hasattr(data, "tensors") and len(data.tensors) == 2:  # TensorDataset
        x, y = data.tensors
    elif isinstance(data, Iterable):
        xs, ys, n = [], [], 0
        for batch in data:
            x, y = batch_xy(batch, "data")
            xs.append(x)
            ys.append(y)
            n += len(x)
            if max_examples is not None and n >= max_examples:
                break
        if not xs:
            raise ValueError("data is empty")
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise TypeError(
            "data must be (inputs, labels) tensors, a TensorDataset or a DataLoader, got "
            f"{type(data).__name__}"
        )
    if len(x) != len(y):
        raise ValueError(f"data has {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ValueError("data is empty")
    if max_examples is not None:
        x, y = x[:max_examples], y[:max_examples]
    return x, y


def input_tensor(x: Any, what: str = "inputs are") -> torch.Tensor:
    """``x`` if it is a tensor; otherwise a ``TypeError`` that says how to make one.

    Example
    -------
    >>> import numpy as np
    >>> from bayesprune.data import input_tensor
    >>> input_tensor(np.zeros((2, 3), np.float32))
    Traceback (most recent call last):
    ...
    TypeError: inputs are a ndarray, not a torch.Tensor; convert them with torch.from_numpy(x).float() (or wrap the arrays in a TensorDataset)
    """
    if torch.is_tensor(x):
        return x
    raise TypeError(
        f"{what} a {type(x).__name__}, not a torch.Tensor; convert them with "
        "torch.from_numpy(x).float() (or wrap the arrays in a TensorDataset)"
    )


def check_finite(x: torch.Tensor, what: str = "inputs") -> torch.Tensor:
    """``x`` unless it holds NaN or infinity; then a ``ValueError`` that counts them.

    A NaN input row gives NaN class scores whose argmax is an arbitrary class: an accuracy, a
    calibration score or a Learn-then-Test loss computed from it is silently wrong. Calibration,
    evaluation and the conformal sets read their inputs through this.

    Example
    -------
    >>> import torch
    >>> from bayesprune.data import check_finite
    >>> check_finite(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), "calibration inputs")
    Traceback (most recent call last):
    ...
    ValueError: calibration inputs hold NaN or infinite values (1 of 2 rows); remove or impute those rows before calibrating or evaluating
    """
    if x.is_floating_point() or x.is_complex():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            rows = int(bad.reshape(x.shape[0], -1).any(1).sum()) if x.ndim else 1
            n = x.shape[0] if x.ndim else 1
            raise ValueError(
                f"{what} hold NaN or infinite values ({rows} of {n} rows); remove or impute "
                "those rows before calibrating or evaluating"
            )
    return x


def check_class_labels(y: torch.Tensor, num_classes: int) -> None:
    """A ``ValueError`` unless ``y`` holds class indices in ``[0, num_classes)``: otherwise
    cross-entropy fails deep inside torch, and an accuracy is silently 0.

    Example
    -------
    >>> import torch
    >>> from bayesprune.data import check_class_labels
    >>> check_class_labels(torch.tensor([0, 10]), 10)
    Traceback (most recent call last):
    ...
    ValueError: class labels must be indices in [0, 10) for a network with 10 outputs; got labels from 0 to 10. Map them to 0..9 (e.g. y - y.min() for consecutive labels)
    """
    if y.numel() and not torch.is_floating_point(y):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"class labels must be indices in [0, {num_classes}) for a network with "
                f"{num_classes} outputs; got labels from {lo} to {hi}. Map them to "
                f"0..{num_classes - 1} (e.g. y - y.min() for consecutive labels)"
            )


@contextmanager
def input_errors(
    net: str, what: str, shape: tuple[int, ...], fix: str = "inputs of the shape it expects"
) -> Iterator[None]:
    """Report a network that cannot run on the inputs it was given as a ``ValueError`` that names them.

    A wrong input shape surfaces as a ``RuntimeError`` from deep inside torch (a matmul or
    convolution shape message); inside this block it becomes ``ValueError("running <net> on
    <what> of shape <shape> failed (<torch's message>); pass <fix>")``. Out-of-memory errors pass
    through unchanged.

    Example
    -------
    >>> import torch
    >>> from bayesprune.data import input_errors
    >>> with input_errors("Linear", "inputs", (2, 3)):
    ...     torch.nn.Linear(4, 1)(torch.zeros(2, 3))
    Traceback (most recent call last):
    ...
    ValueError: running Linear on inputs of shape (2, 3) failed (mat1 and mat2 shapes cannot be multiplied (2x3 and 4x1)); pass inputs of the shape it expects
    """
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, IndexError) as exc:  # IndexError: a missing batch axis
        if "dtype" in str(exc) or "Double" in str(exc):
            fix = (
                "inputs of the dtype of the network's parameters: "
                "x.to(next(net.parameters()).dtype) (NumPy arrays are float64)"
            )
        raise ValueError(
            f"running {net} on {what} of shape {tuple(shape)} failed ({exc}); pass {fix}"
        ) from exc


@contextmanager
def label_errors(out: torch.Tensor, labels: torch.Tensor) -> Iterator[None]:
    """Turn cross-entropy's ``IndexError`` for a label outside the classes of the logits ``out``
    (``[batch, C, ...]``) into :func:`check_class_labels`' ``ValueError``, which names the fix.

    Checking only when the loss fails keeps the label scan off the training step; labels of
    cross-entropy's ``ignore_index`` (-100) are left out of the check.

    Example
    -------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from bayesprune.data import label_errors
    >>> out = torch.zeros(2, 3)
    >>> with label_errors(out, torch.tensor([0, 5])):
    ...     F.cross_entropy(out, torch.tensor([0, 5]))
    Traceback (most recent call last):
    ...
    ValueError: class labels must be indices in [0, 3) for a network with 3 outputs; got labels from 0 to 5. Map them to 0..2 (e.g. y - y.min() for consecutive labels)
    """
    try:
        yield
    except IndexError:
        if out.dim() > 1:
            check_class_labels(labels[labels != -100], out.shape[1])
        raise
    except RuntimeError as exc:
        if "target dtype" in str(exc) or "expected scalar type Long" in str(exc):
            raise TypeError(
                f"class labels must be torch.long, got {labels.dtype}; convert them with y.long()"
            ) from None
        raise


def output_tensor(out: Any, net: nn.Module) -> torch.Tensor:
    """``out``, the output of ``net``, if it is one tensor; otherwise a ``TypeError`` that says how
    to get one.

    Training and scoring read one output tensor (class logits, or regression outputs). Some
    networks return more in training mode (torchvision's GoogLeNet and Inception-v3 return their
    auxiliary heads' logits too).

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> from bayesprune.data import output_tensor
    >>> output_tensor((torch.zeros(2, 3), torch.zeros(2, 3)), nn.Identity())
    Traceback (most recent call last):
    ...
    TypeError: Identity's forward returned a tuple, not one tensor of outputs. Build it without auxiliary outputs (e.g. torchvision's googlenet(aux_logits=False)) or wrap it in a module whose forward returns the main output
    """
    if torch.is_tensor(out):
        return out
    raise TypeError(
        f"{type(net).__name__}'s forward returned a {type(out).__name__}, not one tensor of "
        "outputs. Build it without auxiliary outputs (e.g. torchvision's "
        "googlenet(aux_logits=False)) or wrap it in a module whose forward returns the main output"
    )


def loader(
    dataset: Dataset,
    batch_size: int = 128,
    *,
    shuffle: bool | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` with a seeded shuffle.

    ``shuffle`` defaults to ``True`` for a dataset used in training; pass ``False`` for evaluation.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True if shuffle is None else shuffle,
        generator=generator,
        drop_last=drop_last,
    )


@dataclass
class PlantedTeacher:
    """A regression task whose answer is known: which hidden units matter.

    Attributes
    ----------
    x, y
        Inputs ``[n, d]`` and noisy targets ``[n]``.
    noise
        Standard deviation of the target noise (the true likelihood scale).
    relevant
        The hidden units the teacher uses: ``0 .. relevant - 1``.
    student
        A network of the teacher's shape (``Linear(d, hidden) - ReLU - Linear(hidden, 1)``) that
        starts near the teacher's weights; a pruning method should keep exactly its first
        ``relevant`` hidden units.
    """

    x: torch.Tensor
    y: torch.Tensor
    noise: float
    relevant: int
    student: nn.Module


def planted_teacher(
    seed: int = 0, n: int = 2000, d: int = 8, hidden: int = 12, relevant: int = 3
) -> PlantedTeacher:
    r"""A sparse teacher MLP and data drawn from it: a check that pruning finds the planted units.

    The teacher has ``hidden`` ReLU units; only the first ``relevant`` reach the output (output
    weights 2, -2, 1.5, ...) and they read inputs 0..3, while the others read only inputs 4..d-1
    and have output weight 0. With :math:`x \sim N(0, I_d)`,

    .. math:: y = \sum_{j < k} v_j \, \mathrm{relu}(w_j^\top x + b_j) + \epsilon,
              \quad \epsilon \sim N(0, 0.3^2).

    The student starts from the teacher's weights plus noise (sd 0.1 on the first layer, 0.05 on
    the output weights), so the irrelevant units begin with small but non-zero output weights.

    Example
    -------
    >>> from bayesprune.data import planted_teacher
    >>> task = planted_teacher(n=100)
    >>> task.x.shape, task.y.shape, task.relevant
    (torch.Size([100, 8]), torch.Size([100]), 3)
    """
    if not 1 <= relevant <= min(hidden, 4):
        raise ValueError(f"relevant must be in 1..{min(hidden, 4)}, got {relevant}")
    if d < 5:
        raise ValueError(f"d must be at least 5 (4 teacher inputs and noise inputs), got {d}")
    g = torch.Generator().manual_seed(seed)
    w1 = torch.zeros(hidden, d)
    w1[:relevant, :4] = torch.randn(relevant, 4, generator=g)
    w1[:relevant] *= 2 / w1[:relevant].norm(dim=1, keepdim=True)
    w1[relevant:, 4:] = torch.randn(hidden - relevant, d - 4, generator=g)
    b1 = 0.1 * torch.randn(hidden, generator=g)
    w2 = torch.zeros(1, hidden)
    w2[0, :relevant] = torch.tensor([2.0, -2.0, 1.5, -1.5][:relevant])
    x = torch.randn(n, d, generator=g)
    noise = 0.3
    y = (torch.relu(x @ w1.T + b1) @ w2.T).squeeze(-1) + noise * torch.randn(n, generator=g)
    net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    with torch.no_grad():
        net[0].weight.copy_(w1 + 0.1 * torch.randn(hidden, d, generator=g))
        net[0].bias.copy_(b1)
        net[2].weight.copy_(w2 + 0.05 * torch.randn(1, hidden, generator=g))
        net[2].bias.zero_()
    return PlantedTeacher(x=x, y=y, noise=noise, relevant=relevant, student=net)
