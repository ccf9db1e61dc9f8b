"""Figures of the user's path: training, inclusion probabilities, pruning, guarantees.

Every function returns a :class:`matplotlib.figure.Figure` built without :mod:`matplotlib.pyplot`
(so nothing is left open in pyplot's global registry and the functions work headless), or draws
into an ``ax`` you pass. Each accepts plain data (lists, NumPy arrays, dicts) and also the package's
own result objects, read by duck typing:

=========================  =====================================================================
function                   plain data / object
=========================  =====================================================================
:func:`plot_elbo`          per-step losses (negative ELBO) / a ``FitResult``
:func:`plot_pips`          ``{layer: PIP per node}`` / a ``BayesianModule``
:func:`plot_pruning_curve` levels, accuracy, fraction of parameters kept / a dict of those
:func:`plot_risk_curve`    levels, risks, ``alpha`` / a ``Certificate``
:func:`plot_set_sizes`     set sizes, or a boolean ``[n, classes]`` set matrix / prediction sets
=========================  =====================================================================

Example
-------
>>> from bayesprune import plots
>>> fig = plots.plot_elbo([3.0, 2.0, 1.5, 1.4])
>>> fig.savefig("/tmp/elbo.png")
>>> fig = plots.plot_pips({"1": [0.9, 0.1, 0.7], "3": [0.2, 0.95]})
>>> len(fig.axes)
2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "plot_elbo",
    "plot_pips",
    "plot_pruning_curve",
    "plot_risk_curve",
    "plot_set_sizes",
]


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """Tensors, lists and arrays to a float NumPy array, with a clear error otherwise."""
    if hasattr(value, "detach"):  # a torch tensor, possibly on the GPU
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{name} must be a sequence of numbers (list, array or tensor), got {type(value).__name__}"
        ) from exc
    return arr


def _vector(value: Any, name: str, *, allow_empty: bool = False) -> np.ndarray:
    arr = _to_numpy(value, name).reshape(-1)
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: nothing to plot")
    return arr


def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _first_attr(obj: Any, names: Sequence[str]) -> Any:
    for n in names:
        value = obj.get(n) if isinstance(obj, Mapping) else getattr(obj, n, None)
        if value is not None:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# ELBO history
# ---------------------------------------------------------------------------------------------
def _elbo_series(history: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(per-step loss, per-epoch loss or None) from a FitResult, a dict or a plain sequence."""
    if isinstance(history, Mapping) or not isinstance(history, Sequence | np.ndarray):
        steps = _first_attr(history, ("loss", "losses", "elbo_loss", "history", "step_loss"))
        epochs = _first_attr(history, ("epoch_loss", "epoch_losses"))
        if steps is None and epochs is None:
            elbo = _first_attr(history, ("elbo", "elbos"))
            if elbo is not None:  # stored as ELBO (to maximise): plot the loss -ELBO
                steps = -_to_numpy(elbo, "elbo")
        if steps is None and epochs is None:
            if hasattr(history, "detach") or isinstance(history, np.ndarray):
                return _vector(history, "history"), None
            raise TypeError(
                "plot_elbo needs per-step losses: a list/array, or an object with a `loss`, "
                f"`epoch_loss` or `elbo` attribute (a FitResult); got {type(history).__name__}"
            )
        step_arr = _vector(steps, "loss") if steps is not None else None
        epoch_arr = _vector(epochs, "epoch_loss") if epochs is not None else None
        if step_arr is None:
            return epoch_arr, None
        return step_arr, epoch_arr
    return _vector(history, "history"), None


def plot_elbo(
    history: Any,
    *,
    ax: Axes | None = None,
    smooth: int | None = None,
    log_scale: bool | None = None,
) -> Figure:
    """Training curve of stochastic variational inference: the loss :math:`-\\mathrm{ELBO}` per step.

    .. math::
        \\mathcal{L}(q) = -\\mathrm{ELBO}(q)
        = -\\mathbb{E}_{q(\\theta)}[\\log p(\\mathcal{D} \\mid \\theta)] + \\mathrm{KL}(q \\,\\|\\, p)

    The raw per-step values are noisy (one minibatch, one Monte-Carlo draw each), so a moving
    average over ``smooth`` steps is drawn on top.

    Parameters
    ----------
    history
        Per-step losses (list, array or tensor), or a ``FitResult`` / dict with a ``loss`` (per step),
        ``epoch_loss`` or ``elbo`` entry.
    ax
        Draw into this axes instead of a new figure.
    smooth
        Window of the moving average; default ``len // 20`` (none for short histories).
    log_scale
        Logarithmic y axis; default: when all values are positive and span more than a factor 20.

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> from bayesprune.plots import plot_elbo
    >>> fig = plot_elbo([10.0, 5.0, 4.0, 3.9, 3.85])
    >>> fig.axes[0].get_ylabel()
    '-ELBO (loss)'
    """
    steps, epoch_loss = _elbo_series(history)
    if not np.all(np.isfinite(steps)):
        bad = int(np.flatnonzero(~np.isfinite(steps))[0])
        raise ValueError(f"the loss history is not finite at step {bad}: the fit diverged")
    fig, ax = _figure_and_axes(ax, (6, 3.5))
    x = np.arange(1, len(steps) + 1)
    ax.plot(x, steps, color="C0", alpha=0.35, lw=1, label="per step")
    window = max(1, len(steps) // 20) if smooth is None else int(smooth)
    if window < 1:
        raise ValueError(f"smooth must be a positive window length, got {smooth}")
    if 1 < window < len(steps):
        kernel = np.ones(window) / window
        avg = np.convolve(steps, kernel, mode="valid")
        ax.plot(x[window - 1 :], avg, color="C0", lw=2, label=f"moving average ({window})")
    if epoch_loss is not None and len(epoch_loss) > 0 and len(epoch_loss) < len(steps):
        per_epoch = len(steps) / len(epoch_loss)
        ax.plot(
            per_epoch * np.arange(1, len(epoch_loss) + 1),
            epoch_loss,
            "o",
            color="C1",
            label="epoch mean",
        )
    if log_scale is None:
        log_scale = bool(np.all(steps > 0) and steps.max() / steps.min() > 20)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("-ELBO (loss)")
    ax.set_title("Variational inference")
    ax.legend(loc="upper right")
    return fig


# ---------------------------------------------------------------------------------------------
# Posterior inclusion probabilities
# ---------------------------------------------------------------------------------------------
def _pip_dict(pips: Any) -> dict[str, np.ndarray]:
    if hasattr(pips, "inclusion_probs") and callable(pips.inclusion_probs):
        pips = pips.inclusion_probs()
    if not isinstance(pips, Mapping):
        raise TypeError(
            "plot_pips needs {layer: PIP per node} or a BayesianModule with inclusion_probs(), "
            f"got {type(pips).__name__}"
        )
    if not pips:
        raise ValueError(
            "no layer has node inclusion probabilities: use a node-level prior such as "
            "bp.priors.SpikeAndSlab(level='node') or bp.priors.GroupHorseshoe()"
        )
    out = {}
    for name, value in pips.items():
        arr = _vector(value, f"PIPs of layer {name!r}")
        if np.any((arr < 0) | (arr > 1)) or not np.all(np.isfinite(arr)):
            raise ValueError(f"PIPs of layer {name!r} must lie in [0, 1]")
        out[str(name)] = arr
    return out


def plot_pips(
    pips: Any,
    *,
    threshold: float | None = 0.5,
    layers: Sequence[str] | None = None,
    ncols: int = 3,
) -> Figure:
    """Posterior inclusion probability (PIP) of every node, one panel per layer, sorted.

    The PIP of node :math:`j` is :math:`\\pi_j = q(z_j = 1)`, the variational posterior probability
    that the node is switched on. Sorting makes the shape readable: a sharp step means the posterior
    has decided which nodes matter; a slow ramp around 0.5 means it has not.

    Parameters
    ----------
    pips
        ``{layer path: PIP per node}`` (what ``bnet.inclusion_probs()`` returns) or the
        ``BayesianModule`` itself.
    threshold
        Draw this pruning threshold and count the nodes at or above it; ``None`` to omit.
    layers
        Only these layers, in this order.
    ncols
        Panels per row.

    Example
    -------
    >>> from bayesprune.plots import plot_pips
    >>> fig = plot_pips({"1": [0.9, 0.1, 0.7], "3": [0.2, 0.95]}, threshold=0.5)
    >>> [a.get_title() for a in fig.axes]
    ['1: 2/3 kept', '3: 1/2 kept']
    """
    data = _pip_dict(pips)
    if layers is not None:
        missing = [n for n in layers if n not in data]
        if missing:
            raise KeyError(f"no PIPs for layers {missing}; available: {sorted(data)}")
        data = {n: data[n] for n in layers}
    if ncols < 1:
        raise ValueError(f"ncols must be positive, got {ncols}")
    n = len(data)
    cols = min(ncols, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, p) in zip(axes, data.items(), strict=False):
        order = np.sort(p)[::-1]
        x = np.arange(len(order))
        ax.fill_between(x, order, step="mid", alpha=0.3, color="C0")
        ax.step(x, order, where="mid", color="C0", lw=1.5)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(-0.5, len(order) - 0.5)
        title = name
        if threshold is not None:
            ax.axhline(threshold, color="C3", ls="--", lw=1)
            title = f"{name}: {int(np.sum(p >= threshold))}/{len(p)} kept"
        ax.set_title(title)
        ax.set_xlabel("node (sorted)")
        ax.set_ylabel("PIP")
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig


# ---------------------------------------------------------------------------------------------
# Accuracy and size against the pruning level
# ---------------------------------------------------------------------------------------------
def plot_pruning_curve(
    levels: Any,
    accuracy: Any = None,
    params_kept: Any = None,
    *,
    chosen: float | None = None,
    dense_accuracy: float | None = None,
    level_label: str = "pruning level",
    ax: Axes | None = None,
) -> Figure:
    """Accuracy (left axis) and fraction of parameters kept (right axis) against the pruning level.

    Parameters
    ----------
    levels
        Pruning levels (thresholds, or fractions of nodes removed), or a dict / object with entries
        ``levels``, ``accuracy`` and ``params_kept``.
    accuracy
        Accuracy of the pruned network at each level, in [0, 1].
    params_kept
        Fraction of the dense network's parameters kept at each level, in [0, 1].
    chosen
        Mark this level (for example the certified one) with a vertical line.
    dense_accuracy
        Draw the dense network's accuracy as a horizontal reference.
    level_label
        x-axis label.

    Example
    -------
    >>> from bayesprune.plots import plot_pruning_curve
    >>> fig = plot_pruning_curve([0.0, 0.5, 0.9], [0.9, 0.89, 0.7], [1.0, 0.4, 0.1], chosen=0.5)
    >>> len(fig.axes)  # accuracy axis and its twin for the size
    2
    """
    if accuracy is None and params_kept is None:
        table = levels
        levels = _first_attr(table, ("levels", "level", "thresholds"))
        accuracy = _first_attr(table, ("accuracy", "accuracies", "acc"))
        params_kept = _first_attr(table, ("params_kept", "params_fraction", "kept"))
        if levels is None or (accuracy is None and params_kept is None):
            raise TypeError(
                "plot_pruning_curve needs levels and accuracy and/or params_kept, or a dict with "
                "keys 'levels', 'accuracy', 'params_kept'"
            )
    lv = _vector(levels, "levels")
    series = {}
    for name, value in (("accuracy", accuracy), ("params_kept", params_kept)):
        if value is not None:
            arr = _vector(value, name)
            if arr.shape != lv.shape:
                raise ValueError(f"{name} has {arr.size} values but levels has {lv.size}")
            series[name] = arr
    fig, ax = _figure_and_axes(ax, (6, 3.5))
    handles = []
    if "accuracy" in series:
        handles += ax.plot(lv, series["accuracy"], "o-", color="C0", label="accuracy")
        ax.set_ylabel("accuracy", color="C0")
    if dense_accuracy is not None:
        handles.append(ax.axhline(dense_accuracy, color="C0", ls=":", lw=1, label="dense accuracy"))
    if "params_kept" in series:
        size_ax = ax.twinx() if "accuracy" in series else ax
        handles += size_ax.plot(
            lv, series["params_kept"], "s--", color="C2", label="parameters kept"
        )
        size_ax.set_ylabel("fraction of parameters kept", color="C2")
        size_ax.set_ylim(0, 1.05)
    if chosen is not None:
        handles.append(ax.axvline(chosen, color="C3", lw=1.5, label=f"chosen ({chosen:.3g})"))
    ax.set_xlabel(level_label)
    ax.set_title("Accuracy and size against pruning level")
    ax.legend(handles=handles, loc="lower left")
    return fig


# ---------------------------------------------------------------------------------------------
# Certified risk curve
# ---------------------------------------------------------------------------------------------
def _certificate_fields(cert: Any) -> dict[str, Any]:
    """Levels, risks, alpha, ... from a ``Certificate``, its ``to_dict()`` / JSON, or a dict."""
    curve = _first_attr(cert, ("curve",))
    fields = {
        "levels": _first_attr(cert, ("levels", "candidates")),
        "risks": _first_attr(cert, ("risks", "empirical_risks", "risk_curve")),
        "upper": _first_attr(cert, ("upper_bounds", "ucb", "upper")),
        "params_kept": None,
        "certified": None,
        "alpha": _first_attr(cert, ("alpha",)),
        "delta": _first_attr(cert, ("delta",)),
        "chosen": _first_attr(cert, ("chosen_level", "level", "chosen")),
        "level_name": _first_attr(cert, ("level_name",)),
    }
    if curve is not None and fields["risks"] is None:
        # Certificate.curve: one dict per candidate with level, params_kept, risk_hat, p_value,
        # rejected
        fields["levels"] = [row["level"] for row in curve]
        fields["risks"] = [row["risk_hat"] for row in curve]
        if all(row.get("params_kept") is not None for row in curve):
            fields["params_kept"] = [row["params_kept"] for row in curve]
        if all("rejected" in row for row in curve):
            fields["certified"] = [bool(row["rejected"]) for row in curve]
    if fields["risks"] is None or fields["alpha"] is None:
        raise TypeError(
            "plot_risk_curve needs risks and alpha, or a Certificate / dict with 'curve' (or "
            f"'risks') and 'alpha'; got {type(cert).__name__}"
        )
    return fields


def plot_risk_curve(
    levels: Any,
    risks: Any = None,
    alpha: float | None = None,
    *,
    chosen: Any = None,
    upper: Any = None,
    delta: float | None = None,
    params_kept: Any = None,
    x: Literal["auto", "level", "params_kept", "index"] = "auto",
    level_label: str = "pruning level",
    ax: Axes | None = None,
) -> Figure:
    r"""Empirical calibration risk of every candidate, the target ``alpha`` and the certified choice.

    Learn-then-Test certifies a candidate :math:`\hat\lambda` such that, with probability at least
    :math:`1-\delta` over the calibration set, the true risk satisfies
    :math:`R(\hat\lambda) \le \alpha`. The empirical risk :math:`\hat R_n(\lambda)` (dots) can
    be below ``alpha`` at candidates that are *not* certified: the certificate also pays for the
    finite calibration set (the upper confidence bound, when given, is drawn dashed). Candidates
    whose null hypothesis :math:`R > \alpha` was rejected are circled.

    Parameters
    ----------
    levels
        Candidate levels, or a ``Certificate`` (or its ``to_dict()`` / saved JSON): then the risks,
        ``alpha``, ``delta``, the chosen level, the fraction of parameters kept and the rejected
        candidates are read from it.
    risks
        Empirical risk of each candidate.
    alpha
        Target risk level.
    chosen
        The certified level; ``None`` when no candidate was certified.
    upper
        Upper confidence bound of the risk of each candidate (optional).
    delta
        Shown in the legend.
    params_kept
        Fraction of parameters kept by each candidate.
    x
        x axis: ``"level"``, ``"params_kept"`` (reversed, so pruning grows to the right),
        ``"index"`` (candidate number), or ``"auto"``: ``params_kept`` when known, else the level.

    Example
    -------
    >>> from bayesprune.plots import plot_risk_curve
    >>> fig = plot_risk_curve([0.1, 0.3, 0.5], [0.01, 0.03, 0.2], alpha=0.05, chosen=0.3)
    >>> fig.axes[0].get_ylabel()
    'risk'
    """
    certified = None
    if risks is None and alpha is None:
        f = _certificate_fields(levels)
        levels, risks, alpha, certified = f["levels"], f["risks"], f["alpha"], f["certified"]
        upper = f["upper"] if upper is None else upper
        delta = f["delta"] if delta is None else delta
        chosen = f["chosen"] if chosen is None else chosen
        params_kept = f["params_kept"] if params_kept is None else params_kept
        if f["level_name"] and level_label == "pruning level":
            level_label = f["level_name"]
    if alpha is None or risks is None:
        raise TypeError("plot_risk_curve needs risks and alpha (or a Certificate)")
    r = _vector(risks, "risks")
    if not 0 < float(alpha) < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if x not in ("auto", "level", "params_kept", "index"):
        raise ValueError(f"x must be 'auto', 'level', 'params_kept' or 'index', got {x!r}")
    if x == "auto":
        x = (
            "params_kept"
            if params_kept is not None
            else ("level" if levels is not None else "index")
        )
    level_list = list(levels) if levels is not None else list(range(len(r)))
    if len(level_list) != len(r):
        raise ValueError(f"risks has {r.size} values but levels has {len(level_list)}")
    chosen_idx = None
    if chosen is not None:
        matches = [i for i, v in enumerate(level_list) if v == chosen]
        chosen_idx = matches[0] if matches else None
    if x == "params_kept":
        if params_kept is None:
            raise ValueError("x='params_kept' needs params_kept (or a Certificate that has them)")
        xs = _vector(params_kept, "params_kept")
        xlabel = "fraction of parameters kept"
    elif x == "index":
        xs = np.arange(1, len(r) + 1, dtype=float)
        xlabel = f"candidate (least to most pruned, by {level_label})"
    else:
        xs = _vector(level_list, "levels")
        xlabel = level_label
    if xs.shape != r.shape:
        raise ValueError(f"risks has {r.size} values but the x axis has {xs.size}")
    fig, ax = _figure_and_axes(ax, (6, 3.5))
    ax.plot(xs, r, "o-", color="C0", label="empirical risk (calibration)")
    if certified is not None and any(certified):
        ok = np.asarray(certified, dtype=bool)
        ax.plot(xs[ok], r[ok], "o", color="C2", ms=10, mfc="none", mew=2,
                label="certified (null rejected)")  # fmt: skip
    if upper is not None:
        u = _vector(upper, "upper")
        if u.shape != r.shape:
            raise ValueError(f"upper has {u.size} values but risks has {r.size}")
        ax.plot(xs, u, "--", color="C0", alpha=0.7, label="upper confidence bound")
    text = f"alpha = {float(alpha):g}" + (
        f", delta = {float(delta):g}" if delta is not None else ""
    )
    ax.axhline(float(alpha), color="C3", ls="--", lw=1.5, label=text)
    if chosen is not None:
        at = xs[chosen_idx] if chosen_idx is not None else float(chosen)
        name = f"{chosen:.4g}" if isinstance(chosen, float) else str(chosen)
        ax.axvline(at, color="C2", lw=2, label=f"certified: {level_label} {name}")
        ax.set_title("Certified risk")
    else:
        ax.set_title("Certified risk: no candidate certified", color="C3")
    if x == "params_kept":
        ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("risk")
    ax.legend(loc="best")
    return fig


# ---------------------------------------------------------------------------------------------
# Prediction-set sizes
# ---------------------------------------------------------------------------------------------
def _set_sizes(sets: Any) -> np.ndarray:
    if hasattr(sets, "detach"):
        sets = sets.detach().cpu().numpy()
    if isinstance(sets, list | tuple) and sets and not np.isscalar(sets[0]):
        # a list of label collections, one per example
        return np.asarray([len(s) for s in sets], dtype=float)
    arr = np.asarray(sets)
    if arr.ndim == 2:  # boolean [n, classes] membership
        if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
            raise ValueError("a 2-d prediction-set array must be boolean membership [n, classes]")
        return arr.sum(axis=1).astype(float)
    return _vector(arr, "sizes")


def plot_set_sizes(
    sets: Any,
    *,
    num_classes: int | None = None,
    alpha: float | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Histogram of conformal prediction-set sizes.

    A split-conformal set :math:`C(x) = \\{y : s(x, y) \\le \\hat q\\}` contains the true label with
    probability at least :math:`1-\\alpha`; small sets mean a confident model, empty sets occur when
    the model is confidently wrong, and sets of all classes say "I don't know".

    Parameters
    ----------
    sets
        Set sizes per example, a boolean ``[n, classes]`` membership matrix, or a list of label sets.
    num_classes
        Largest possible size (x-axis range); default the largest size seen.
    alpha
        Shown in the title.

    Example
    -------
    >>> from bayesprune.plots import plot_set_sizes
    >>> fig = plot_set_sizes([1, 1, 2, 1, 3, 0])
    >>> fig.axes[0].get_xlabel()
    'prediction-set size'
    """
    sizes = _set_sizes(sets)
    if np.any(sizes < 0) or np.any(sizes != np.round(sizes)):
        raise ValueError("set sizes must be non-negative integers")
    top = int(sizes.max()) if num_classes is None else int(num_classes)
    if top < sizes.max():
        raise ValueError(
            f"num_classes={num_classes} is smaller than the largest set ({sizes.max():g})"
        )
    fig, ax = _figure_and_axes(ax, (5, 3.5))
    counts = np.bincount(sizes.astype(int), minlength=top + 1)
    ax.bar(np.arange(top + 1), counts / len(sizes), color="C0", edgecolor="white")
    ax.axvline(sizes.mean(), color="C3", ls="--", label=f"mean size {sizes.mean():.2f}")
    ax.set_xticks(np.arange(top + 1))
    ax.set_xlabel("prediction-set size")
    ax.set_ylabel("fraction of examples")
    title = "Conformal prediction sets"
    if alpha is not None:
        title += f" (alpha = {alpha:g})"
    ax.set_title(title)
    ax.legend(loc="upper right")
    return fig
