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

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.infer
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from ._compiled import LossStep
from ._fit_phases import (
    Optimizers,
    _delay_steps,
    _lr_factor,
    check_options,
    end_of_fit,
    epoch_loop,
    note_stop,
    restore_checkpoint,
    restore_rng,
    step_counts,
)
from ._utils import param_effect, resolve_device
from .gate_tests import DEFAULT_SIZE as DEFAULT_TEST_SIZE
from .gate_tests import GateTests
from .layers import BayesianLayer
from .module import BayesianModule
from .natural import BernoulliNaturalGradient
from .priors.gates_kl import gates_kl, gates_only

__all__ = ["FitResult", "LocalReparamELBO", "fit", "model_kl"]


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
    compiled, compile_seconds
        Whether the steps ran compiled (``fit(compile=True)`` and compilation worked), and the
        wall time of the first compiled step, compilation included (0 otherwise).
    gate_tests
        What the exact tests of the gate switches did (``fit(gate_tests=...)``,
        :mod:`bayesprune.gate_tests`): tests run, switches off and on taken, switches refused,
        gates held at the end, seconds spent; empty with ``gate_tests=None`` or without
        point-weight gates.
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
    compiled: bool = False
    compile_seconds: float = 0.0
    gate_tests: dict[str, float] = field(default_factory=dict)

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
    optim, loss=LocalReparamELBO())`` works (after ``bnet.num_data = N``, which the default
    prior's price needs); :func:`fit` calls :meth:`differentiable_loss` directly
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
        kl = model_kl(bnet)
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


def _gates_only(layer: BayesianLayer) -> bool:
    """Whether the layer's KL is the Bernoulli KL of its gate logits alone (point-weight node
    spike-and-slab, the default)."""
    # (a layer class with a KL of its own keeps it)
    return type(layer).kl is BayesianLayer.kl and gates_only(layer.prior)


def model_kl(bnet: BayesianModule) -> torch.Tensor:
    r"""``bnet.kl()`` in fewer operators: the KL terms of the layers with the default prior
    (point-weight node spike-and-slab: the Bernoulli KL of the gate logits) are computed on all
    their gate logits at once (:func:`bayesprune.priors.gates_kl.gates_kl`), one set of
    elementwise operators for all of them instead of one per layer; the other layers'
    ``layer.kl()`` are added to it.

    The same function of the parameters: each logit's terms and gradient are computed by the
    same elementwise operators (the gradients are bit-identical); only the order of the final
    sums differs, so the value may differ from ``bnet.kl()`` in its last bits.

    >>> import torch
    >>> from torch import nn
    >>> import bayesprune as bp
    >>> from bayesprune.inference import model_kl
    >>> bnet = bp.bayesianize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    >>> bnet.num_data = 100  # the default prior's price needs N (bp.fit sets it)
    >>> torch.allclose(model_kl(bnet), bnet.kl())
    True
    """
    gated, total = [], None
    for layer in bnet.bayesian_layers.values():
        if _gates_only(layer):
            gated.append(layer)
        else:
            term = layer.kl()
            total = term if total is None else total + term
    if gated:
        term = gates_kl(gated)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros((), device=bnet.device)


def make_adam(params: Iterable, lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` with the fused kernel where this torch has it (fewer passes over the
    parameters: the optimizer column of ``benchmarks/svi_speed.py``)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # old torch or unsupported device / dtype
        return torch.optim.Adam(params, lr=lr)


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
    devices: int | None = None,
    sync_batchnorm: bool = False,
    compile: bool = False,
    gate_tests: int | None = DEFAULT_TEST_SIZE,
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
        a ``ValueError``, as the state of Pyro's optimizer is not saved. A checkpoint of a fit
        on any number of processes (``devices``) resumes on any number.
    devices
        Data-parallel SVI on this many processes (:mod:`bayesprune.distributed`): ``None`` or 1
        (default) is one process. ``devices=N > 1`` starts ``N`` local processes (gloo on the
        CPU, each with ``1/N`` of torch's threads; NCCL with ``device="cuda"``, one GPU each),
        runs the fit on them and returns process 0's :class:`FitResult`, the fitted parameters
        put back into ``bnet``. A script that does so must call ``fit`` under
        ``if __name__ == "__main__":`` (the processes are spawned, and pickle ``bnet`` and the
        loaders). Called inside an initialised ``torch.distributed`` process group of several
        processes (``torchrun``, ``srun``), ``fit`` runs as that process's rank, on the GPU of
        its ``LOCAL_RANK`` with ``device="cuda"``; several machines work that way. The
        ``train_loader`` is the one-process ``DataLoader``: its ``batch_size`` is the global
        batch, split across the processes (each needs at least one example of every batch), and
        the ELBO is scaled by the whole training set as on one process; each process draws its
        own weights and gates (:func:`bayesprune.distributed.rank_seed` of ``seed``). Default
        fit only (``elbo=None``).
    sync_batchnorm
        With ``devices``: ``False`` (default) normalises each process's share of a batch with its
        own BatchNorm statistics and averages the running statistics over the processes after
        every epoch; ``True`` uses ``torch.nn.SyncBatchNorm`` (statistics of the global batch,
        GPUs only).
    compile
        ``True`` compiles the sampled forward pass, the loss and its backward with
        ``torch.compile`` (the optimizers stay eager); inductor draws its random numbers as eager
        PyTorch does, so a seeded step draws the same gates and gives the same loss to float
        tolerance. Where compilation fails, the fit goes on with the eager step and one warning
        (``FitResult.compiled`` says which ran). Off by default: on a CPU, compiling takes
        seconds to a minute and gains a fraction of a millisecond (MLPs) to a quarter of the step
        (ResNet-20) per step, so it pays only for long fits of conv nets
        (``docs/compiled-step.md``). One process only, default fit only (``elbo=None``).
    gate_tests
        Training examples (the first ``gate_tests`` that the fit sees) on which every
        switch of a point-weight gate that the natural step proposes is tested exactly before it
        is taken (:mod:`bayesprune.gate_tests`: a switch is taken only when it lowers NLL +
        :math:`\beta` KL of the median-probability model; a refused gate is held for an epoch or
        more). Default 256. ``None`` turns the tests off: the natural step alone, which on a
        trained network can switch off many needed nodes at once
        (``docs/notes/gate-decisions.md``). Each test costs a forward pass over these examples
        from the tested layer on (:mod:`bayesprune.replay`); ``FitResult.gate_tests`` reports how many ran and their time. Fast ELBO only.

    Raises
    ------
    FloatingPointError
        The loss became NaN or infinite; the message names the epoch and step.
    KeyboardInterrupt
        (and any other error during training) The history so far, the steps of the unfinished
        epoch included, is attached to the exception as ``exc.fit_result``; a note on the
        exception says from which epoch ``resume=`` would continue.
    """
    distributed.check_devices(devices)
    info = distributed.current(devices)
    spawn = distributed.needs_spawn(devices)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if compile and (elbo is not None or spawn or info is not None):
        raise ValueError(
            "compile=True compiles the default fit's step on one process: drop elbo= and "
            "devices= (or run outside a torch.distributed process group), or drop compile"
        )
    if (spawn or info is not None) and elbo is not None:
        raise ValueError(
            "a distributed fit (devices > 1, or fit inside a torch.distributed process group) "
            "runs the default fit only: elbo= runs pyro.infer.SVI on one process. Drop elbo=, "
            "or run it with devices=None outside a process group"
        )
    if sync_batchnorm and not (spawn or info is not None):
        raise ValueError(
            "sync_batchnorm=True synchronizes BatchNorm across processes, and this fit runs on "
            "one: pass devices=N > 1 (or call fit under torchrun), or drop sync_batchnorm"
        )
    n = check_options(
        bnet,
        train_loader,
        epochs=epochs,
        lr=lr,
        num_data=num_data,
        val_loader=val_loader,
        kl_warmup=kl_warmup,
        kl_weight=kl_weight,
        elbo=elbo,
        structure_lr=structure_lr,
        structure_delay=structure_delay,
        lr_schedule=lr_schedule,
        checkpoint=checkpoint,
        resume=resume,
        gate_step=gate_step,
        gate_tests=gate_tests,
    )
    if spawn:
        dev = resolve_device(device) if device is not None else bnet.device
        distributed.check_sync_batchnorm(sync_batchnorm, devices, dev.type)
        kwargs = dict(
            epochs=epochs, lr=lr, device=device, num_data=num_data, val_loader=val_loader,
            progress=progress, kl_warmup=kl_warmup, seed=seed, kl_weight=kl_weight,
            structure_lr=structure_lr, structure_delay=structure_delay, lr_schedule=lr_schedule,
            val_samples=val_samples, checkpoint=checkpoint, resume=resume, gate_step=gate_step,
            sync_batchnorm=sync_batchnorm, gate_tests=gate_tests,
        )  # fmt: skip
        return distributed.spawn_fit(fit, bnet, train_loader, kwargs, devices=devices, device=dev)
    saved = ckpt.load_fit_state(resume) if resume is not None else None
    steps_per_epoch, total_steps, warmup_steps = step_counts(train_loader, epochs, kl_warmup)
    # what a resumed fit must repeat (the random states are restored, so seed may be left out)
    options = {
        "epochs": epochs,
        "lr": lr,
        "structure_lr": structure_lr,
        "structure_delay": structure_delay,
        "gate_step": gate_step,
        "gate_tests": gate_tests,
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
    loop_loader, swapped = train_loader, []
    if info is not None:
        dev = distributed.rank_device(device, bnet.device, info)
        distributed.check_sync_batchnorm(sync_batchnorm, info.world, dev.type)
        shared = distributed.shared_seed(seed)
        if saved is None:
            ckpt.seed_loader(train_loader, shared)  # the same global batches on every process
        loop_loader = distributed.ShardedLoader(train_loader, info, shared)
        if sync_batchnorm:
            swapped = distributed.to_sync_batchnorm(bnet)
    else:
        if saved is None and seed is not None:
            torch.manual_seed(seed)
            pyro.set_rng_seed(seed)
            ckpt.seed_loader(train_loader, seed)
        dev = resolve_device(device) if device is not None else bnet.device
    bnet.to(dev)
    bnet.set_num_data(n)

    optimizers = _build_optimizers(
        bnet,
        elbo,
        lr=lr,
        structure_lr=structure_lr,
        structure_delay=structure_delay,
        gate_step=gate_step,
        lr_schedule=lr_schedule,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )
    if optimizers.fast:
        optimizers.loss_step = LossStep(optimizers.elbo, bnet, compile=compile)
    lead = info is None or info.rank == 0  # draws the bar, validates, checkpoints, warns
    if info is not None:
        optimizers.sync = distributed.GradientSync(
            bnet, optimizers.gate_ids, info, sync_bn=sync_batchnorm
        )
    if optimizers.natural is not None and gate_tests is not None:
        share = n if info is None else max(1, n // info.world)  # the examples one process sees
        optimizers.gate_tests = GateTests.for_natural(
            bnet,
            optimizers.natural,
            min(gate_tests, share),
            reduce=optimizers.sync.sum if optimizers.sync is not None else None,
        )
        optimizers.stateful["gate_tests"] = optimizers.gate_tests
    result = FitResult(num_data=n, kl_weight=float(kl_weight))
    run = restore_checkpoint(saved, checkpoint, bnet, optimizers, result)
    if info is not None:
        loop_loader.passes = run.first_epoch
    bar = tqdm(
        total=total_steps,
        initial=run.step,
        disable=not (progress and lead),
        desc="fit (SVI)",
        leave=False,
    )
    run.start = time.perf_counter() - result.seconds
    modes = [(m, m.training) for m in bnet.modules()]  # given back as they were, after the fit
    bnet.train()
    if saved is not None:  # last, so that nothing above draws from the restored generators
        restore_rng(saved, dev, train_loader)
    try:
        epoch_loop(
            bnet,
            loop_loader,
            optimizers,
            result,
            run,
            bar,
            epochs=epochs,
            n=n,
            dev=dev,
            warmup_steps=warmup_steps,
            kl_weight=kl_weight,
            progress=progress,
            val_loader=val_loader,
            val_samples=val_samples,
            checkpoint=checkpoint,
            options=options,
        )
    except (KeyboardInterrupt, Exception) as exc:
        note_stop(exc, result, run, epochs, checkpoint)
        raise
    finally:
        if optimizers.gate_tests is not None:
            result.gate_tests = optimizers.gate_tests.summary()
        if optimizers.loss_step is not None:
            result.compiled = optimizers.loss_step.compiled
            result.compile_seconds = optimizers.loss_step.compile_seconds
        bnet._kl_scale = 1.0
        bar.close()
        distributed.restore_batchnorm(swapped)
        for m, training in modes:
            m.training = training
    result.seconds = time.perf_counter() - run.start
    if lead:
        end_of_fit(bnet, result, run)
    return result


def _build_optimizers(
    bnet: BayesianModule,
    elbo: pyro.infer.ELBO | None,
    *,
    lr: float,
    structure_lr: float | None,
    structure_delay: float | None,
    gate_step: float,
    lr_schedule: str,
    total_steps: int | None,
    steps_per_epoch: int | None,
) -> Optimizers:
    """The objective, optimizers and schedules of :func:`fit` (a phase of it: see
    :mod:`bayesprune._fit_phases`).

    The fast ELBO (``elbo=None``): Adam over the weights (``lr``) and the structure parameters
    other than the point-weight gates (``structure_lr``, frozen for the ``structure_delay``),
    the natural-gradient step of the point-weight gates (``gate_step``, frozen as long), each
    with its ``lr_schedule``. A custom ``elbo``: ``pyro.infer.SVI`` with Pyro's Adam, under
    Pyro's cosine schedule when ``lr_schedule="cosine"``.
    """
    if elbo is None:
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
        return Optimizers(
            elbo_obj,
            fast=True,
            opt=opt,
            sched=sched,
            natural=natural,
            gate_sched=gate_sched,
            gate_ids=gate_ids,
            stateful=stateful,
        )
    if lr_schedule == "cosine" and total_steps:
        optim = pyro.optim.CosineAnnealingLR(
            {"optimizer": torch.optim.Adam, "optim_args": {"lr": lr}, "T_max": total_steps}
        )
        scheduler = optim
    else:
        optim = pyro.optim.Adam({"lr": lr})
        scheduler = None
    svi = pyro.infer.SVI(bnet.model, bnet.guide, optim, loss=elbo)
    return Optimizers(elbo, fast=False, svi=svi, pyro_scheduler=scheduler)
