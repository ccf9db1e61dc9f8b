"""The phases of :func:`bayesprune.fit`, in the order it calls them (private).

1. :func:`check_options`: every argument, before anything is read or moved (``_num_data``: the
   training-set size :math:`N`), then :func:`step_counts` once a resumed fit's state is read;
2. building the optimizers and schedulers (:func:`bayesprune.inference._build_optimizers`, next
   to the ELBO and Adam it instantiates), held in :class:`Optimizers`;
3. :func:`restore_checkpoint`: a resumed fit's module, optimizer states and history (the random
   states come last, :func:`restore_rng`, so that nothing drawn before the loop uses them);
4. :func:`epoch_loop`: the SVI steps (:func:`fit_step`) and, after each epoch, the summaries,
   validation and checkpoint (:func:`end_of_epoch`); :func:`note_stop` annotates an exception
   that stops it;
5. :func:`end_of_fit`: the check that the PIPs separate nodes (:mod:`bayesprune.diagnostics`).

The progress of a fit (step, epoch, traced hidden layers, the epochs a checkpoint holds) travels
between the phases in :class:`Progress`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyro
import pyro.infer
import torch

from . import checkpoint as ckpt
from .data import batch_xy, input_errors
from .diagnostics import hidden_layers, informativeness_warnings, median_model, nodes_off
from .files import check_target
from .module import BayesianModule
from .natural import BernoulliNaturalGradient

if TYPE_CHECKING:
    from .inference import FitResult

#: what the first batch must be when the network fails on it
_FIX = "inputs of the shape the wrapped network expects, with the batch first"


# -- 1. options ---------------------------------------------------------------------------------
def check_options(
    bnet: BayesianModule,
    train_loader: Iterable,
    *,
    epochs: int,
    lr: float,
    num_data: int | None,
    val_loader: Iterable | None,
    kl_warmup: float,
    kl_weight: float,
    elbo: pyro.infer.ELBO | None,
    structure_lr: float | None,
    structure_delay: float | None,
    lr_schedule: str,
    checkpoint: str | Path | None,
    resume: str | Path | None,
    gate_step: float,
    gate_tests: int | None,
) -> int:
    """Refuse bad arguments of :func:`bayesprune.fit`; returns the training-set size :math:`N`."""
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
    if gate_tests is not None and (
        isinstance(gate_tests, bool) or not isinstance(gate_tests, int) or gate_tests < 1
    ):
        raise ValueError(
            f"gate_tests must be a positive number of training examples (default 256) or None "
            f"(no exact tests of the gate switches), got {gate_tests!r}"
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
    return n


def step_counts(
    train_loader: Iterable, epochs: int, kl_warmup: float
) -> tuple[int | None, int | None, float]:
    """``(steps_per_epoch, total_steps, warmup_steps)``: ``None`` for a loader without a length."""
    steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
    if steps_per_epoch == 0:
        raise ValueError("train_loader is empty")
    total_steps = epochs * steps_per_epoch if steps_per_epoch else None
    warmup_steps = kl_warmup * steps_per_epoch if steps_per_epoch else 0
    if kl_warmup and not steps_per_epoch:
        raise ValueError("kl_warmup needs a train_loader with a length")
    return steps_per_epoch, total_steps, warmup_steps


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
                stacklevel=4,  # fit's caller (through check_options and fit)
            )
        return num_data
    if seen is None:
        raise ValueError(
            "cannot tell the training-set size N from train_loader (it has no sized sampler or "
            "dataset); pass num_data=N so the minibatch ELBO is scaled by N / batch size"
        )
    return seen


# -- 2. optimizers ------------------------------------------------------------------------------
@dataclass
class Optimizers:
    """The objective and what steps it: the fast ELBO with Adam, the natural-gradient step of the
    point-weight gates and their learning-rate schedules (``fast``), or ``pyro.infer.SVI`` with a
    Pyro optimizer (a custom ``elbo``)."""

    elbo: Any
    fast: bool
    opt: torch.optim.Optimizer | None = None
    sched: Any = None
    natural: BernoulliNaturalGradient | None = None
    gate_sched: Any = None
    #: ids of the gate logits that the natural step moves (their gradients are not zeroed with
    #: Adam's; the gate tests clear those of the gates they test or hold)
    gate_ids: set[int] = field(default_factory=set)
    #: what a checkpoint saves and a resumed fit restores, by name
    stateful: dict[str, Any] = field(default_factory=dict)
    svi: pyro.infer.SVI | None = None
    #: the Pyro learning-rate scheduler stepped after each SVI step (cosine schedule only)
    pyro_scheduler: Any = None
    #: a distributed fit's all-reduce of each step (``bayesprune.distributed.GradientSync``)
    sync: Any = None
    #: the loss of a step, eager or compiled (``bayesprune._compiled.LossStep``; ``None``: eager)
    loss_step: Any = None
    #: the exact tests of the natural step's gate switches (``bayesprune.gate_tests.GateTests``)
    gate_tests: Any = None


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


# -- 3. restoring a checkpoint ------------------------------------------------------------------
@dataclass
class Progress:
    """How far a fit has come, shared by the phases (and by the note of an interrupted fit)."""

    step: int = 0
    first_epoch: int = 0
    #: the epoch running (the last one, once the loop is over)
    epoch: int = 0
    #: node-PIP layers that are not the output, traced after the first epoch
    hidden: list[str] | None = None
    #: epochs that the fit state at ``checkpoint`` holds, for a stop's note
    saved_epochs: int | None = None
    #: ``time.perf_counter()`` at the start, less the seconds of the runs before a resume
    start: float = 0.0


def restore_checkpoint(
    saved: dict[str, Any] | None,
    checkpoint: str | Path | None,
    bnet: BayesianModule,
    optimizers: Optimizers,
    result: FitResult,
) -> Progress:
    """Where the fit starts: from scratch, or where the fit state ``saved`` (``resume=``) left
    off, its module parameters, optimizer and scheduler states and history put back."""
    run = Progress()
    if saved is not None:
        run.hidden, run.step, run.first_epoch = ckpt.restore(
            saved, bnet, optimizers.stateful, result
        )
    if saved is not None and checkpoint is not None:
        same = ckpt.state_path(checkpoint).resolve() == Path(saved["file"]).resolve()
        run.saved_epochs = run.first_epoch if same else None
    run.epoch = run.first_epoch
    return run


def restore_rng(saved: dict[str, Any], dev: torch.device, train_loader: Iterable) -> None:
    """The random states of a resumed fit (the last thing before the loop)."""
    lost = ckpt.set_rng_state(saved["state"]["rng"], dev, train_loader)
    if lost:
        warnings.warn(
            f"resume: could not restore {'; '.join(lost)}: the fit goes on, but not exactly "
            "as it would have without the interruption",
            stacklevel=3,  # fit's caller
        )


# -- 4. the epoch loop --------------------------------------------------------------------------
def epoch_loop(
    bnet: BayesianModule,
    train_loader: Iterable,
    optimizers: Optimizers,
    result: FitResult,
    run: Progress,
    bar: Any,
    *,
    epochs: int,
    n: int,
    dev: torch.device,
    warmup_steps: float,
    kl_weight: float,
    progress: bool,
    val_loader: Iterable | None,
    val_samples: int,
    checkpoint: str | Path | None,
    options: dict[str, Any],
) -> None:
    """The epochs from ``run.first_epoch`` on: SVI steps, then the end-of-epoch summaries."""
    net_name = type(bnet.net).__name__
    for epoch in range(run.first_epoch, epochs):
        run.epoch = epoch
        if optimizers.gate_tests is not None:
            optimizers.gate_tests.epoch = epoch
        epoch_sum, epoch_count = 0.0, 0
        for batch in train_loader:
            x, y = batch_xy(batch, "train_loader")
            bnet._check_batch(x, y)
            if not run.step:
                bnet.input_shape = tuple(x.shape[1:])
            if x.shape[0] > n:
                raise ValueError(
                    f"a batch of {x.shape[0]} examples is larger than num_data={n}, the "
                    "training-set size that scales the ELBO; pass the number of training "
                    "examples, or leave num_data unset to take it from train_loader"
                )
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            beta = kl_weight * (min(1.0, (run.step + 1) / warmup_steps) if warmup_steps else 1.0)
            value = fit_step(bnet, optimizers, result, run, x, y, beta, net_name)
            run.step += 1
            result.loss.append(value)
            epoch_sum += value
            epoch_count += 1
            bar.update()
            if progress:
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4g}", refresh=False)
        if epoch_count == 0:
            raise ValueError("train_loader is empty")
        result.epoch_loss.append(epoch_sum / epoch_count)
        end_of_epoch(
            bnet,
            train_loader,
            optimizers,
            result,
            run,
            x,
            dev=dev,
            val_loader=val_loader,
            val_samples=val_samples,
            checkpoint=checkpoint,
            options=options,
        )


def fit_step(
    bnet: BayesianModule,
    optimizers: Optimizers,
    result: FitResult,
    run: Progress,
    x: torch.Tensor,
    y: torch.Tensor,
    beta: float,
    net_name: str,
) -> float:
    """One SVI step on the batch ``(x, y)`` with KL weight ``beta``; returns the loss."""
    o = optimizers
    if o.gate_tests is not None:
        o.gate_tests.collect(x, y)  # (nothing once it holds its examples)
    if o.fast:
        o.elbo.kl_scale = beta
        # only the first batch: a later failure is not about the input shape
        checked = (
            input_errors(net_name, "the first batch", x.shape, _FIX)
            if not run.step
            else nullcontext()
        )
        with checked:
            if o.loss_step is not None:
                loss = o.loss_step(x, y)
            else:
                loss = o.elbo.differentiable_loss(bnet.model, bnet.guide, x, y)
        if o.sync is None:
            # the three numbers of the history in one read (one device sync instead of four)
            value, nll, kl = torch.stack((loss.detach(), o.elbo.last_nll, o.elbo.last_kl)).tolist()
            if not math.isfinite(value):
                _raise_nonfinite(value, run.epoch, run.step)
        o.opt.zero_grad(set_to_none=True)
        # The gate gradients are NOT cleared here: every natural step uses their running
        # sum since the start of the fit, or since a gate test cleared that gate's (see
        # bayesprune.natural, "What bp.fit runs").
        # Clearing them gives the damped CAVI step, whose fixed point leaves most PIPs
        # undecided (issue 22's closing note). The sign changes it proposes are tested
        # exactly before they are taken (bayesprune.gate_tests).
        # A distributed step averages the new gradients only, and adds them to the sums.
        held = o.sync.hold() if o.sync is not None else None
        if o.loss_step is None:
            loss.backward()
        else:
            redone = o.loss_step.backward(loss, x, y)
            if redone is not loss and o.sync is None:  # run again eagerly: its numbers count
                loss = redone
                value, nll, kl = torch.stack(
                    (loss.detach(), o.elbo.last_nll, o.elbo.last_kl)
                ).tolist()
        if o.sync is not None:
            value, nll = o.sync.reduce(held, loss, o.elbo.last_nll, x.shape[0])
            if not math.isfinite(value):  # the same on every process: all of them stop
                _raise_nonfinite(value, run.epoch, run.step)
        o.opt.step()
        o.sched.step()
        if o.natural is not None:
            o.natural.beta = beta
            before = o.gate_tests.before_step() if o.gate_tests is not None else None
            o.natural.step()
            if o.gate_tests is not None:
                o.gate_tests.after_step(o.natural, before)
            o.gate_sched.step()
        if o.sync is not None:
            kl = o.elbo.last_kl.item()
        result.kl.append(kl)
        result.nll.append(nll)
    else:
        bnet._kl_scale = beta
        value = o.svi.step(x, y)
        if not math.isfinite(value):
            _raise_nonfinite(value, run.epoch, run.step)
        if o.pyro_scheduler is not None:
            o.pyro_scheduler.step()
    return value


def end_of_epoch(
    bnet: BayesianModule,
    train_loader: Iterable,
    optimizers: Optimizers,
    result: FitResult,
    run: Progress,
    x: torch.Tensor,
    *,
    dev: torch.device,
    val_loader: Iterable | None,
    val_samples: int,
    checkpoint: str | Path | None,
    options: dict[str, Any],
) -> None:
    """After an epoch: the share of nodes off, the validation accuracies, the checkpoint (``x``:
    the epoch's last batch, to trace the hidden layers on after the first epoch). In a
    distributed fit, process 0 alone validates and writes the checkpoint."""
    lead = optimizers.sync is None or optimizers.sync.rank == 0
    if optimizers.sync is not None:
        optimizers.sync.end_of_epoch(bnet)
    if run.hidden is None:
        run.hidden = _hidden(bnet, x)
    for k, v in nodes_off(bnet, run.hidden).items():
        result.nodes_off.setdefault(k, []).append(v)
    if val_loader is not None and lead:
        median = median_model(bnet, run.hidden) if run.hidden else None
        acc, acc_median = _val_accuracy(bnet, val_loader, dev, val_samples, median)
        result.val_accuracy.append(acc)
        if acc_median is not None:
            result.val_median_accuracy.append(acc_median)
        bnet.train()
    if checkpoint is not None and lead:
        if optimizers.fast:
            result.seconds = time.perf_counter() - run.start
            progress_made = {"epoch": run.epoch + 1, "step": run.step, "hidden": run.hidden}
            # the gate logits' gradients are not zeroed with Adam's: they sum over the steps
            grads = {k: p.grad for k, p in bnet.named_parameters() if id(p) in optimizers.gate_ids}
            ckpt.save_fit_state(
                ckpt.state_path(checkpoint),
                bnet,
                {name: obj.state_dict() for name, obj in optimizers.stateful.items()},
                result,
                rng=ckpt.rng_state(dev, train_loader),
                options=options,
                grads=grads,
                **progress_made,
            )
        ckpt.save_module(bnet, checkpoint)
        run.saved_epochs = run.epoch + 1 if optimizers.fast else None


def note_stop(
    exc: BaseException,
    result: FitResult,
    run: Progress,
    epochs: int,
    checkpoint: str | Path | None,
) -> None:
    """Attach the history so far to ``exc``, which stopped the loop, and say where it stopped
    (and from which epoch ``resume=`` continues)."""
    result.seconds = time.perf_counter() - run.start
    exc.fit_result = result  # type: ignore[attr-defined]
    if run.step or isinstance(exc, KeyboardInterrupt):
        where = f"fit stopped in epoch {run.epoch + 1} of {epochs}, after {run.step} steps"
        if run.saved_epochs:
            where += (
                f"; fit(..., resume={str(checkpoint)!r}) continues from the end of epoch "
                f"{run.saved_epochs}, which the checkpoint holds"
            )
        exc.add_note(f"{where}. The history so far is in this exception's .fit_result")


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


def _hidden(bnet: BayesianModule, x: torch.Tensor) -> list[str]:
    """Node-PIP layers whose units are not the network's output, traced on one example of the
    last batch (an untraceable network gets every node-PIP layer, with a warning)."""
    if not bnet.inclusion_probs():
        return []
    example = x[:1].detach()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hidden_layers(bnet, example)
    except Exception as exc:  # the fit itself succeeded; say what is missing
        warnings.warn(
            f"fit could not trace {type(bnet.net).__name__} to tell hidden layers from output "
            f"layers ({type(exc).__name__}: {exc}); nodes_off and the median-model accuracy "
            "then count every layer with node PIPs",
            stacklevel=5,  # fit's caller (through end_of_epoch, epoch_loop and fit)
        )
        return list(bnet.inclusion_probs())


def _raise_nonfinite(value: float, epoch: int, step: int) -> None:
    raise FloatingPointError(
        f"the ELBO loss became {value} at epoch {epoch + 1}, step {step + 1}; lower the learning "
        "rate, check the inputs for NaN/inf, or use a broader prior"
    )


# -- 5. end of the fit --------------------------------------------------------------------------
def end_of_fit(bnet: BayesianModule, result: FitResult, run: Progress) -> None:
    """Whether the PIPs separate nodes: the messages go to ``result.warnings`` and are issued as
    ``UserWarning`` s."""
    result.warnings = informativeness_warnings(
        bnet,
        run.hidden or [],
        val_accuracy=result.val_accuracy[-1] if result.val_accuracy else None,
        median_accuracy=result.val_median_accuracy[-1] if result.val_median_accuracy else None,
    )
    for message in result.warnings:
        warnings.warn(message, stacklevel=3)  # fit's caller
