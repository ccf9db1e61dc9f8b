r"""Stochastic variational inference: :func:`fit`, the fast :class:`LocalReparamELBO`, :class:`FitResult`.

The objective is the evidence lower bound of the model of :class:`bayesprune.BayesianModule`,

.. math::
    \mathcal L(q) = \sum_{n=1}^{N} \mathbb E_q[\log p(y_n \mid x_n, w)] - \mathrm{KL}(q(w) \,\|\, p(w)),

estimated on a minibatch :math:`B` as

.. math::
    \hat{\mathcal L} = \frac{N}{|B|} \sum_{n \in B} \log p(y_n \mid x_n, \hat w_n) - \mathrm{KL},

with one local-reparameterization forward pass (:math:`\hat w_n` is implicit: each example's
pre-activations are an exact draw from their marginal under :math:`q`) and the KL in closed form.
:math:`N` is the training-set size (the examples ``train_loader`` draws from, or ``num_data``),
never the batch size: this is what makes the minibatch ELBO unbiased. It is the same objective that
``pyro.infer.Trace_ELBO`` estimates on ``bnet.model`` / ``bnet.guide`` (tested), with much lower
variance and cost; ``fit(..., elbo=pyro.infer.Trace_ELBO())`` runs the genuine ``pyro.infer.SVI``.

Example
-------
>>> import torch
>>> import bayesprune as bp
>>> from torch.utils.data import DataLoader, TensorDataset
>>> x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
>>> net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> bnet = bp.bayesianize(net)
>>> result = bp.fit(bnet, DataLoader(TensorDataset(x, y), batch_size=16), epochs=2, progress=False)
>>> len(result.loss), result.num_data
(8, 64)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.infer
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from ._utils import param_effect, resolve_device
from .bayesianize import BayesianModule
from .data import batch_xy, input_errors
from .diagnostics import hidden_layers, informativeness_warnings, median_model, nodes_off
from .files import check_target
from .natural import BernoulliNaturalGradient

__all__ = ["FitResult", "LocalReparamELBO", "fit"]


@dataclass
class FitResult:
    r"""History of :func:`fit`.

    Attributes
    ----------
    loss
        Negative ELBO estimate (nats, full-data scale) per step; with ``kl_weight`` β != 1 the
        tempered objective NLL + β KL.
    epoch_loss
        Mean of ``loss`` per epoch.
    kl
        KL term per step (fast ELBO only; empty with a custom ``elbo``).
    nll
        Negative expected log-likelihood term per step, full-data scale (fast ELBO only).
    val_accuracy
        Posterior-predictive accuracy on ``val_loader`` after each epoch (categorical only).
    val_median_accuracy
        Accuracy on ``val_loader`` of the median-probability model (posterior means, hidden
        nodes with PIP < 1/2 zeroed: what ``prune(threshold=0.5)`` keeps) after each epoch;
        node-level priors only.
    nodes_off
        Per hidden layer with node PIPs, the share of nodes with PIP < 1/2 after each epoch.
    warnings
        The messages of the end-of-fit check that the PIPs separate nodes
        (:mod:`bayesprune.diagnostics`); each was also issued as a ``UserWarning``.
    num_data
        :math:`N` used for the ELBO scaling.
    kl_weight
        :math:`\beta` of the objective at the end of the fit (1: the ELBO); report it with any
        result.
    seconds
        Wall-clock time of the whole fit.
    """

    loss: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_median_accuracy: list[float] = field(default_factory=list)
    nodes_off: dict[str, list[float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    num_data: int = 0
    kl_weight: float = 1.0
    seconds: float = 0.0

    @property
    def elbo(self) -> list[float]:
        """ELBO estimate per step (``-loss``)."""
        return [-v for v in self.loss]


def _bnet_of(model) -> BayesianModule:
    bnet = getattr(model, "__self__", None)
    if not isinstance(bnet, BayesianModule):
        raise TypeError(
            "LocalReparamELBO works with the model of a BayesianModule: pass bnet.model and bnet.guide"
        )
    return bnet


class LocalReparamELBO(pyro.infer.ELBO):
    r"""Fast ELBO of a :class:`~bayesprune.BayesianModule`: ``(N / B) * NLL + KL``.

    One local-reparameterization forward pass estimates the expected log-likelihood; the KL is
    analytic. Gates are exact Bernoulli draws whose gradient comes from the prior's
    ``gate_gradient`` estimator (trapezoid by default, or the binary-Concrete straight-through
    one): the loss *value* equals in expectation that of ``pyro.infer.Trace_ELBO`` on
    ``(bnet.model, bnet.guide)``, and the gate logits' gradient is a biased, low-variance
    estimate of its gradient.
    It follows :class:`pyro.infer.ELBO`'s interface, so ``pyro.infer.SVI(bnet.model, bnet.guide,
    optim, loss=LocalReparamELBO())`` works; :func:`fit` calls :meth:`differentiable_loss` directly
    with a plain ``torch.optim.Adam``.
    """

    def __init__(self) -> None:
        super().__init__(num_particles=1)
        self.kl_scale = 1.0
        self.last_kl: torch.Tensor | None = None
        self.last_nll: torch.Tensor | None = None

    def differentiable_loss(self, model, guide, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bnet = _bnet_of(model)
        if pyro.poutine.runtime.am_i_wrapped():
            # make the parameters visible to pyro.infer.SVI's param capture
            for name, p in bnet.named_parameters():
                param_effect(f"bnet.{name}", p)
        out = bnet(x)
        n = bnet.num_data or x.shape[0]
        nll = -bnet.log_likelihood(out, y).sum() * (n / x.shape[0])
        kl = bnet.kl()
        self.last_kl = kl.detach()
        self.last_nll = nll.detach()
        return nll + self.kl_scale * kl

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - not trace based
        raise NotImplementedError("LocalReparamELBO does not use traces")

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


def make_adam(params: Iterable, lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` with the fused kernel where this torch has it (fewer passes over the
    parameters: the optimizer column of ``benchmarks/svi_speed.py``)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # old torch or unsupported device / dtype
        return torch.optim.Adam(params, lr=lr)


def _delay_steps(
    structure_delay: float | None, total: int | None, steps_per_epoch: int | None
) -> int:
    """Steps during which the structure parameters stay frozen.

    The default (``None``) is 10% of the steps but at most one epoch. The freeze is there for the
    weights to settle under the variational noise, which should take a number of steps rather
    than a share of the fit. Frozen for longer, gates that are on let units the data do not need
    take on work (``benchmarks/planted.py``; its runs are in ``docs/notes/benchmark-history.md``,
    "Gate freeze").
    """
    if not total:
        return 0
    if structure_delay is None:
        return min(int(0.1 * total), steps_per_epoch or total)
    return int(structure_delay * total)


def _lr_factor(schedule: str, total: int | None, start: int):
    """Learning-rate multiplier per step: 0 during the first ``start`` steps, then cosine / flat."""

    def factor(step: int) -> float:
        if step < start:
            return 0.0
        if schedule == "constant" or not total:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    return factor


def _examples(train_loader: Iterable) -> int | None:
    """The training examples ``train_loader`` draws from: its sampler's length (a
    ``SubsetRandomSampler`` draws from fewer than its dataset holds), else its dataset's. A
    sampler that draws with replacement (``WeightedRandomSampler``) counts draws, not examples,
    and so does one given ``num_samples`` (``RandomSampler``, ``WeightedRandomSampler``), which
    draws other examples each epoch: then the dataset's length."""
    sampler = getattr(train_loader, "sampler", None)
    if getattr(sampler, "replacement", False) or hasattr(sampler, "num_samples"):
        sampler = None
    for source in (sampler, getattr(train_loader, "dataset", None)):
        try:
            return len(source)  # type: ignore[arg-type]
        except TypeError:
            continue
    return None


def _num_data(train_loader: Iterable, num_data: int | None) -> int:
    seen = _examples(train_loader)
    if num_data is not None:
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        if seen is not None and seen != num_data:
            warnings.warn(
                f"num_data={num_data}, but train_loader draws from {seen} examples: the likelihood "
                f"is weighed as if there were {num_data}. Leave num_data unset unless that is "
                "what you mean",
                stacklevel=3,
            )
        return num_data
    if seen is None:
        raise ValueError(
            "cannot tell the training-set size N from train_loader (it has no sized sampler or "
            "dataset); pass num_data=N so the minibatch ELBO is scaled by N / batch size"
        )
    return seen


@torch.no_grad()
def _val_accuracy(
    bnet: BayesianModule, loader: Iterable, dev: torch.device, samples: int, median=None
) -> tuple[float, float | None]:
    """Posterior-predictive accuracy on ``loader``, and that of the plain network ``median``."""
    correct = correct_median = total = 0
    if median is not None:
        median.to(dev).eval()
    for batch in loader:
        x, y = batch_xy(batch, "val_loader")
        x, y = x.to(dev), y.to(dev)
        probs = bnet.predict(x, num_samples=samples)
        correct += int((probs.argmax(-1) == y).sum())
        if median is not None:
            correct_median += int((median(x).argmax(-1) == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("val_loader is empty")
    return correct / total, (None if median is None else correct_median / total)


def fit(
    bnet: BayesianModule,
    train_loader: Iterable,
    epochs: int = 10,
    lr: float = 1e-3,
    device: str | torch.device | None = None,
    num_data: int | None = None,
    val_loader: Iterable | None = None,
    progress: bool = True,
    kl_warmup: float = 0,
    seed: int | None = None,
    *,
    kl_weight: float = 1.0,
    elbo: pyro.infer.ELBO | None = None,
    structure_lr: float | None = None,
    structure_delay: float | None = None,
    lr_schedule: str = "cosine",
    val_samples: int = 8,
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    gate_step: float = 0.01,
) -> FitResult:
    r"""Fit the variational posterior of ``bnet`` by stochastic variational inference.

    Parameters
    ----------
    bnet
        A :class:`~bayesprune.BayesianModule` from :func:`~bayesprune.bayesianize`; trained in place.
    train_loader
        Iterable of ``(x, y)`` minibatches (a ``DataLoader``).
    epochs, lr
        Passes over the data; Adam learning rate.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device`` or ``None`` (the module's device).
    num_data
        Training-set size :math:`N`. Default: the number of examples ``train_loader`` draws
        from, ``len(train_loader.sampler)`` (a subset sampler draws from fewer than its dataset
        holds), else ``len(train_loader.dataset)``.
    val_loader
        Posterior-predictive accuracy on it after every epoch (``val_samples`` draws);
        categorical likelihood only.
    progress
        tqdm progress bar.
    kl_warmup
        Epochs over which the KL weight grows linearly from 0 to 1 (0 = no warm-up).
    seed
        Makes the fit repeatable: run twice from the same ``bnet`` state on the same loader with
        the same ``seed``, it gives the same result (bit for bit on the CPU). At the start it
        seeds torch's generators (CPU and every CUDA device), Python's ``random`` and NumPy's
        global generator (``pyro.set_rng_seed``). They drive every random draw of the fit
        (weights, gates, the validation draws), the shuffling of a ``DataLoader`` whose sampler
        has no generator of its own (``shuffle=True``: the sampler draws its seed from torch's
        generator) and the seeds of its worker processes (``num_workers > 0``: each worker's
        torch, ``random`` and NumPy generators are seeded from a base seed drawn the same way). A
        ``torch.Generator`` the loader brings is seeded with ``seed`` too, or it would go on from
        where the last pass over the loader left it: ``DataLoader(generator=g)`` (as
        :func:`bayesprune.data.loader` builds), its sampler's or batch sampler's ``generator``, or
        the ``generator`` attribute of a custom loader. Not covered: the state of ``bnet`` before
        the fit (set by the network and ``bayesianize``), other random sources of the loader (a
        ``DistributedSampler``'s ``seed`` and ``epoch``, worker processes kept with
        ``persistent_workers=True``, which keep their random state from pass to pass, generators
        held by the dataset or its transforms), and GPU kernels that are not deterministic (see
        ``torch.use_deterministic_algorithms``). Bit-identical results also need the same torch
        version, device and number of threads. ``None``: nothing is seeded. With ``resume`` the
        random states saved in the checkpoint are restored instead.
    kl_weight
        :math:`\beta` of the tempered objective :math:`\mathbb E_q[\log p(y \mid x, w)] - \beta\,
        \mathrm{KL}(q \| p)`. 1 (default) is the ELBO, i.e. Bayesian inference. :math:`\beta < 1` is
        a tempered ("cold") posterior that trusts the data more than the prior: less weight noise,
        fewer nodes pruned. Its PIPs are then those of the tempered posterior, not of the Bayesian one;
        report :math:`\beta` with any result. With the default point-weight spike-and-slab the
        KL is that of the gates alone and :math:`\beta = 1` is the intended setting
        (``benchmarks/README.md#robustness``); with ``weights="gaussian"`` the weights' KL
        dominates on small data, and tempering was the only way to keep nodes
        (``docs/notes/benchmark-history.md``, "Accuracy and sparsity of node spike-and-slab").
    elbo
        ``None`` (default): :class:`LocalReparamELBO` with ``torch.optim.Adam`` over
        ``bnet.parameters()``. Any other ``pyro.infer.ELBO`` (e.g. ``Trace_ELBO()``) runs
        ``pyro.infer.SVI(bnet.model, bnet.guide, pyro.optim.Adam, loss=elbo)``.
    structure_lr
        Adam learning rate of the structure parameters
        (:meth:`~bayesprune.BayesianModule.structure_parameters`: shrinkage scales, and the gate
        logits of layers with Bayesian weights) other than the point-weight gates; default
        ``10 * lr`` (fast ELBO only).
    gate_step
        :math:`\rho` of the natural-gradient step of the gate logits of point-weight layers
        (:meth:`~bayesprune.BayesianModule.gate_parameters`, :mod:`bayesprune.natural`): each step moves a gate :math:`\rho` of the way to its
        optimum given the rest, so a gate averages its likelihood signal over about
        :math:`1/\rho` steps. It follows ``lr_schedule`` and waits out ``structure_delay``
        like the other structure parameters (fast ELBO only).
    structure_delay
        Fraction of the steps during which the structure parameters are frozen, so that the
        weights first settle under the variational noise. The straight-through gate gradient at
        :math:`z = 1` is the derivative of the loss along the node's scale, which is far from zero
        until the weights have adapted and would otherwise push useful gates off (fast ELBO only).
        Default ``None``: 10% of the steps, at most one epoch. A long freeze has its own cost:
        while every gate is on, units the data do not need take on work and then stay on.
    lr_schedule
        ``"cosine"`` (decay to 0 over all steps) or ``"constant"``.
    checkpoint
        A file path. After every epoch ``bnet`` is saved there in the format of
        :meth:`~bayesprune.BayesianModule.save` (``bp.load(path, net)`` reads it), and the fit
        state at ``path.resume``, which ``resume=`` reads (default fit only;
        :mod:`bayesprune.checkpoint`). The fit state holds the module, so it is about three
        times the size of the module file. Each file is written to a temporary file in the same
        folder and then moved into place: an interruption leaves the previous file whole and no
        partial file.
    resume
        Continue the fit that was given ``checkpoint=resume``, from the end of the last epoch
        it saved. Pass a ``bnet`` built the same way (``bp.bayesianize`` of the same network,
        prior and options; its own parameters are overwritten), the same training data, batch
        size and sampler, and the same options (``epochs``, the learning rates, schedule, KL
        settings, ``val_loader`` given or not, ...; ``seed`` may be left out): a ``ValueError``
        lists the options that differ, and also says when the file is not a fit checkpoint or
        holds a finished fit. It restores the module's parameters and buffers; the optimizers'
        states (Adam's moments and step counts, and the gate logits' gradients, which carry
        over from step to step); the learning-rate schedules' position, so that the schedule
        over all ``epochs`` and the ``structure_delay`` freeze carry on instead of restarting;
        the epoch and step reached; the :class:`FitResult` history (``seconds`` adds up the
        time of all the runs); and the random states (torch's CPU generator, the fit device's
        CUDA generator, Python's ``random``, NumPy's global generator, and the
        ``torch.Generator`` objects of ``train_loader`` listed under ``seed``). On the CPU a fit
        stopped after any epoch and resumed ends bit-identical to the same fit run straight
        through. Pass ``checkpoint=`` too to keep saving. Default fit only: with ``elbo=`` it is
        a ``ValueError``, as the state of Pyro's optimizer is not saved.

    Raises
    ------
    FloatingPointError
        The loss became NaN or infinite; the message names the epoch and step.
    KeyboardInterrupt
        (and any other error during training) The history so far, the steps of the unfinished
        epoch included, is attached to the exception as ``exc.fit_result``; a note on the
        exception says from which epoch ``resume=`` would continue.
    """
    if not isinstance(bnet, BayesianModule):
        raise TypeError(
            f"fit expects a BayesianModule from bp.bayesianize(net), got {type(bnet).__name__}"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if structure_lr is not None and not structure_lr > 0:
        raise ValueError(f"structure_lr must be positive, got {structure_lr}")
    if isinstance(gate_step, bool) or not isinstance(gate_step, (int, float)):
        raise TypeError(f"gate_step must be a number in (0, 1], got {gate_step!r}")
    if not 0 < gate_step <= 1:
        raise ValueError(
            f"gate_step must be in (0, 1] (the fraction of the way to each gate's optimum per "
            f"step), got {gate_step}"
        )
    if structure_delay is not None and not 0 <= structure_delay < 1:
        raise ValueError(
            f"structure_delay must be a fraction in [0, 1) or None (10% of the steps, at most "
            f"one epoch), got {structure_delay}"
        )
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not kl_weight > 0:
        raise ValueError(f"kl_weight must be a positive number (1 = the ELBO), got {kl_weight!r}")
    if kl_warmup < 0:
        raise ValueError(f"kl_warmup must be >= 0 epochs, got {kl_warmup}")
    if kl_warmup > epochs:
        raise ValueError(
            f"kl_warmup={kl_warmup} epochs is longer than the fit ({epochs} epochs): the KL weight "
            f"would end at {kl_weight * epochs / kl_warmup:.3g}, not kl_weight={kl_weight}. Use "
            "kl_warmup <= epochs (or lower kl_weight on purpose)"
        )
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
    if not isinstance(train_loader, Iterable):
        raise TypeError(
            f"train_loader must be an iterable of (x, y) batches such as a DataLoader, got {type(train_loader).__name__}"
        )
    if val_loader is not None and bnet.likelihood != "categorical":
        raise ValueError(
            "val_loader gives a validation accuracy after each epoch, which needs a categorical "
            f"likelihood; this BayesianModule's is {bnet.likelihood!r}. Drop val_loader and "
            "evaluate bnet.predict_regression yourself"
        )
    if elbo is not None and not isinstance(elbo, pyro.infer.ELBO):
        raise TypeError(f"elbo must be a pyro.infer.ELBO such as Trace_ELBO(), got {elbo!r}")
    if isinstance(train_loader, list | tuple):  # a list of batches: check it before asking for N
        if not train_loader:
            raise ValueError("train_loader is empty")
        batch_xy(train_loader[0], "train_loader")
    n = _num_data(train_loader, num_data)
    if checkpoint is not None:
        check_target(checkpoint)
        ckpt.check_path(checkpoint)
    if resume is not None and elbo is not None:
        raise ValueError(
            "resume= continues the default fit only (elbo=None): the state of the Pyro optimizer "
            "that elbo= uses is not saved. Drop elbo=, or start a new fit"
        )
    saved = ckpt.load_fit_state(resume) if resume is not None else None
    steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
    if steps_per_epoch == 0:
        raise ValueError("train_loader is empty")
    total_steps = epochs * steps_per_epoch if steps_per_epoch else None
    warmup_steps = kl_warmup * steps_per_epoch if steps_per_epoch else 0
    if kl_warmup and not steps_per_epoch:
        raise ValueError("kl_warmup needs a train_loader with a length")
    # what a resumed fit must repeat (the random states are restored, so seed may be left out)
    options = {
        "epochs": epochs,
        "lr": lr,
        "structure_lr": structure_lr,
        "structure_delay": structure_delay,
        "gate_step": gate_step,
        "lr_schedule": lr_schedule,
        "kl_warmup": kl_warmup,
        "kl_weight": kl_weight,
        "num_data": n,
        "batches_per_epoch": steps_per_epoch,
        "val_loader": val_loader is not None,
        "val_samples": val_samples,
        "seed": seed,
    }
    if saved is not None:
        ckpt.check_resumable(saved, options, bnet)
    elif seed is not None:
        torch.manual_seed(seed)
        pyro.set_rng_seed(seed)
        ckpt.seed_loader(train_loader, seed)
    dev = resolve_device(device) if device is not None else bnet.device
    bnet.to(dev)
    bnet.num_data = n

    fast = elbo is None
    net_name = type(bnet.net).__name__
    fix = "inputs of the shape the wrapped network expects, with the batch first"
    if fast:
        elbo_obj = LocalReparamELBO()
        gates = bnet.gate_parameters()
        gate_ids = {id(p) for p in gates}
        structure = [p for p in bnet.structure_parameters() if id(p) not in gate_ids]
        ids = {id(p) for p in structure} | gate_ids
        # point-estimated weights keep frozen sds: they are not fitted
        rest = [p for p in bnet.parameters() if id(p) not in ids and p.requires_grad]
        groups = [{"params": rest, "lr": lr}]
        if structure:
            groups.append({"params": structure, "lr": structure_lr or 10 * lr})
        opt = make_adam(groups, lr)
        delay = _delay_steps(structure_delay, total_steps, steps_per_epoch)
        factors = [_lr_factor(lr_schedule, total_steps, 0)]
        if structure:
            factors.append(_lr_factor(lr_schedule, total_steps, delay))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        natural = gate_sched = None
        if gates:
            natural = BernoulliNaturalGradient(gates, lr=float(gate_step))
            gate_sched = torch.optim.lr_scheduler.LambdaLR(
                natural, _lr_factor(lr_schedule, total_steps, delay)
            )
        stateful = {"optimizer": opt, "scheduler": sched}
        if natural is not None:
            stateful.update(gate_optimizer=natural, gate_scheduler=gate_sched)
    else:
        elbo_obj = elbo
        if lr_schedule == "cosine" and total_steps:
            optim = pyro.optim.CosineAnnealingLR(
                {"optimizer": torch.optim.Adam, "optim_args": {"lr": lr}, "T_max": total_steps}
            )
        else:
            optim = pyro.optim.Adam({"lr": lr})
        svi = pyro.infer.SVI(bnet.model, bnet.guide, optim, loss=elbo_obj)

    result = FitResult(num_data=n, kl_weight=float(kl_weight))
    hidden: list[str] | None = None
    step = first_epoch = 0
    if saved is not None:
        hidden, step, first_epoch = ckpt.restore(saved, bnet, stateful, result)
    saved_epochs = None  # epochs that the fit state at `checkpoint` holds, for a stop's note
    if saved is not None and checkpoint is not None:
        same = ckpt.state_path(checkpoint).resolve() == Path(saved["file"]).resolve()
        saved_epochs = first_epoch if same else None
    bar = tqdm(total=total_steps, initial=step, disable=not progress, desc="fit (SVI)", leave=False)
    start = time.perf_counter() - result.seconds
    modes = [(m, m.training) for m in bnet.modules()]  # given back as they were, after the fit
    bnet.train()
    if saved is not None:  # last, so that nothing above draws from the restored generators
        lost = ckpt.set_rng_state(saved["state"]["rng"], dev, train_loader)
        if lost:
            warnings.warn(
                f"resume: could not restore {'; '.join(lost)}: the fit goes on, but not exactly "
                "as it would have without the interruption",
                stacklevel=2,
            )
    epoch = first_epoch
    try:
        for epoch in range(first_epoch, epochs):
            epoch_sum, epoch_count = 0.0, 0
            for batch in train_loader:
                x, y = batch_xy(batch, "train_loader")
                bnet._check_batch(x, y)
                if not step:
                    bnet.input_shape = tuple(x.shape[1:])
                if x.shape[0] > n:
                    raise ValueError(
                        f"a batch of {x.shape[0]} examples is larger than num_data={n}, the "
                        "training-set size that scales the ELBO; pass the number of training "
                        "examples, or leave num_data unset to take it from train_loader"
                    )
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                beta = kl_weight * (min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)
                if fast:
                    elbo_obj.kl_scale = beta
                    # only the first batch: a later failure is not about the input shape
                    checked = (
                        input_errors(net_name, "the first batch", x.shape, fix)
                        if not step
                        else nullcontext()
                    )
                    with checked:
                        loss = elbo_obj.differentiable_loss(bnet.model, bnet.guide, x, y)
                    if not torch.isfinite(loss):
                        _raise_nonfinite(loss.item(), epoch, step)
                    opt.zero_grad(set_to_none=True)
                    # The gate gradients are NOT cleared: every natural step uses their running
                    # sum since the start of the fit (see bayesprune.natural, "What bp.fit runs").
                    # Clearing them gives the damped CAVI step, whose fixed point leaves most PIPs
                    # undecided (issue 22's closing note); kept until a principled replacement.
                    loss.backward()
                    opt.step()
                    sched.step()
                    if natural is not None:
                        natural.beta = beta
                        natural.step()
                        gate_sched.step()
                    value = loss.item()
                    result.kl.append(elbo_obj.last_kl.item())
                    result.nll.append(elbo_obj.last_nll.item())
                else:
                    bnet._kl_scale = beta
                    value = svi.step(x, y)
                    if not math.isfinite(value):
                        _raise_nonfinite(value, epoch, step)
                    if lr_schedule == "cosine" and total_steps:
                        optim.step()
                step += 1
                result.loss.append(value)
                epoch_sum += value
                epoch_count += 1
                bar.update()
                if progress:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4g}")
            if epoch_count == 0:
                raise ValueError("train_loader is empty")
            result.epoch_loss.append(epoch_sum / epoch_count)
            if hidden is None:
                hidden = _hidden(bnet, x)
            for k, v in nodes_off(bnet, hidden).items():
                result.nodes_off.setdefault(k, []).append(v)
            if val_loader is not None:
                median = median_model(bnet, hidden) if hidden else None
                acc, acc_median = _val_accuracy(bnet, val_loader, dev, val_samples, median)
                result.val_accuracy.append(acc)
                if acc_median is not None:
                    result.val_median_accuracy.append(acc_median)
                bnet.train()
            if checkpoint is not None:
                if fast:
                    result.seconds = time.perf_counter() - start
                    progress_made = {"epoch": epoch + 1, "step": step, "hidden": hidden}
                    # the gate logits' gradients are never zeroed: they sum over the steps
                    grads = {k: p.grad for k, p in bnet.named_parameters() if id(p) in gate_ids}
                    ckpt.save_fit_state(
                        ckpt.state_path(checkpoint),
                        bnet,
                        {name: obj.state_dict() for name, obj in stateful.items()},
                        result,
                        rng=ckpt.rng_state(dev, train_loader),
                        options=options,
                        grads=grads,
                        **progress_made,
                    )
                ckpt.save_module(bnet, checkpoint)
                saved_epochs = epoch + 1 if fast else None
    except (KeyboardInterrupt, Exception) as exc:
        result.seconds = time.perf_counter() - start
        exc.fit_result = result  # type: ignore[attr-defined]
        if step or isinstance(exc, KeyboardInterrupt):
            where = f"fit stopped in epoch {epoch + 1} of {epochs}, after {step} steps"
            if saved_epochs:
                where += (
                    f"; fit(..., resume={str(checkpoint)!r}) continues from the end of epoch "
                    f"{saved_epochs}, which the checkpoint holds"
                )
            exc.add_note(f"{where}. The history so far is in this exception's .fit_result")
        raise
    finally:
        bnet._kl_scale = 1.0
        bar.close()
        for m, training in modes:
            m.training = training
    result.seconds = time.perf_counter() - start
    result.warnings = informativeness_warnings(
        bnet,
        hidden or [],
        val_accuracy=result.val_accuracy[-1] if result.val_accuracy else None,
        median_accuracy=result.val_median_accuracy[-1] if result.val_median_accuracy else None,
    )
    for message in result.warnings:
        warnings.warn(message, stacklevel=2)
    return result


def _hidden(bnet: BayesianModule, x: torch.Tensor) -> list[str]:
    """Node-PIP layers whose units are not the network's output, traced on one example of the
    last batch (an untraceable network gets every node-PIP layer, with a warning)."""
    if not bnet.inclusion_probs():
        return []
    example = x[:1].detach().cpu()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hidden_layers(bnet, example)
    except Exception as exc:  # the fit itself succeeded; say what is missing
        warnings.warn(
            f"fit could not trace {type(bnet.net).__name__} to tell hidden layers from output "
            f"layers ({type(exc).__name__}: {exc}); nodes_off and the median-model accuracy "
            "then count every layer with node PIPs",
            stacklevel=3,
        )
        return list(bnet.inclusion_probs())


def _raise_nonfinite(value: float, epoch: int, step: int) -> None:
    raise FloatingPointError(
        f"the ELBO loss became {value} at epoch {epoch + 1}, step {step + 1}; lower the learning "
        "rate, check the inputs for NaN/inf, or use a broader prior"
    )
