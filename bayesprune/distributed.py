r"""Data-parallel SVI: :func:`bayesprune.fit` on several processes, CPUs (gloo) or GPUs (NCCL).

``bp.fit(bnet, loader, devices=N)`` runs the same SVI on ``N`` processes, each on a share of
every batch; ``bayesprune fit --devices N`` does the same from the command line. The engine is
``torch.distributed`` (no extra dependency): ``fit`` started outside a process group with
``devices=N > 1`` starts ``N`` local processes itself (:func:`launch`, ``torch.multiprocessing``,
gloo on CPUs, NCCL on GPUs); ``fit`` called inside an initialised process group of several
processes, as under ``torchrun`` or ``srun``, runs as that process's rank. Both are one code path.

Why not DDP's module wrapper or Lightning: the forward of an SVI step runs inside the ELBO, not
through a wrapped module; the node gates of point-weight layers are moved by a natural-gradient
step that uses the running *sum* of their gradients (:mod:`bayesprune.natural`), which a gradient
hook that averages whatever ``.grad`` holds would mix up with the new gradient; and a ragged
batch needs its shares weighted by size. One all-reduce of one flat buffer per step does all of
that in a few lines, with ``torch.distributed``'s own collectives and launchers.

What each step computes (the ELBO is scaled as on one process)
--------------------------------------------------------------
The loader passed to ``fit`` is the one you would use on one process: its batch size is the
*global* batch :math:`B`, and every process sees the same sequence of global batches (the same
sampler, seeded alike). Process :math:`r` takes the :math:`r`-th contiguous share of each batch
(:func:`shard_bounds`, sizes :math:`b_r` differing by at most one, :math:`\sum_r b_r = B`), and
computes the usual loss of its share, :math:`\ell_r = (N / b_r)\,\mathrm{NLL}_r + \beta\,
\mathrm{KL}`, with :math:`N` the size of the whole training set. The gradients are then averaged
with weights :math:`b_r / B`:

.. math::
    \sum_r \frac{b_r}{B} \nabla \ell_r = \frac{N}{B} \sum_r \nabla\mathrm{NLL}_r
    + \beta\,\nabla\mathrm{KL},

the gradient of the single-process loss of the global batch, the KL counted once. A last batch
smaller than the others is weighted by its size this way (no ``drop_last`` needed), as long as it
has at least one example per process (else a ``ValueError`` names the fix). The loss, NLL and KL
in the :class:`~bayesprune.FitResult` are those of the global batch, reduced the same way.

The gate logits of point-weight layers keep the running sum of their gradients over the steps
(:mod:`bayesprune.natural`): each step only the *new* gradient is averaged, and added to the sum,
which thereby stays identical on every process and equal to the single-process one.

Random draws and order: the weight noise and gate draws of process :math:`r` come from its own
seed, :func:`rank_seed` of the fit's ``seed``, epoch and :math:`r` (re-seeded at the start of every
epoch, so a distributed fit resumed on as many processes continues exactly, but for the tests of
the gate switches, :mod:`bayesprune.gate_tests`, whose examples the checkpoint holds for
process 0 alone). The global order of the examples is drawn from the loader's generator,
seeded with ``seed`` on every process, or, for a sampler that draws from torch's global
generator, from a generator the processes share. With ``seed=None``, process 0 draws a seed and
sends it to the others.

After every step the parameters are the same on every process (each applies the same averaged
gradient); after every epoch the BatchNorm running statistics are averaged over the processes and
the parameters are checked to be identical. BatchNorm normalises each share with its own batch
statistics by default; ``sync_batchnorm=True`` uses ``torch.nn.SyncBatchNorm`` (GPUs only, as
torch's kernel is), which normalises with those of the global batch.

Process 0 draws the progress bar, computes the validation accuracy and writes the checkpoints;
its :class:`~bayesprune.FitResult` is the one ``fit`` returns (with ``devices=N``, in the calling
process, whose ``bnet`` then holds the fitted parameters). A checkpoint of a fit on any number of
processes resumes on any number (one included): the step count and schedules depend on the
global batch only.

Several machines
----------------
Start one process per GPU on every machine with ``torchrun`` (or ``srun`` under SLURM), create the
process group and call ``fit`` as on one process::

    # train.py
    import torch.distributed as dist
    import bayesprune as bp
    dist.init_process_group("nccl")  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    bnet = bp.bayesianize(net)
    result = bp.fit(bnet, loader, device="cuda", epochs=10, seed=0, checkpoint="fit.safetensors")
    if dist.get_rank() == 0:
        bnet.save("bayesian.safetensors")

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py

Each process uses the GPU of its ``LOCAL_RANK``. Under SLURM, ``srun`` one ``torchrun`` per node
with ``--nproc-per-node`` the node's GPUs (or set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` from ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``).

Example
-------
>>> import torch
>>> import bayesprune as bp
>>> from bayesprune.distributed import rank_seed, shard_bounds
>>> shard_bounds(10, 3)
[(0, 4), (4, 7), (7, 10)]
>>> rank_seed(0, 0) != rank_seed(0, 1)
True
>>> # in a script, under ``if __name__ == "__main__":`` (the processes are spawned)
>>> result = bp.fit(bnet, loader, devices=2, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import pickle
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

__all__ = ["RankInfo", "launch", "rank_seed", "shard_bounds"]

#: what a loader must be for fit to split its batches across processes
_LOADER_FIX = (
    "pass the torch.utils.data.DataLoader over a map-style dataset, with a batch_size, that you "
    "would use on one process (fit splits each of its batches across the processes)"
)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _derive(*words: int) -> int:
    """A 32-bit seed (what NumPy's global generator takes) from integers (``SeedSequence``)."""
    return int(np.random.SeedSequence([w % 2**64 for w in words]).generate_state(1)[0])


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of the random draws (weight noise, gates) of process ``rank`` in epoch ``epoch``
    of a distributed fit with ``seed``: torch's, Python's and NumPy's global generators are seeded
    with it (``pyro.set_rng_seed``) at the start of the epoch. Distinct for every rank.

    >>> from bayesprune.distributed import rank_seed
    >>> rank_seed(0, 1) == rank_seed(0, 1), rank_seed(0, 1) == rank_seed(0, 1, epoch=1)
    (True, False)
    """
    return _derive(seed, 0, rank, epoch)


def shard_bounds(size: int, world: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each process's share of a batch of ``size`` examples: contiguous,
    the first ``size % world`` shares one longer.

    >>> from bayesprune.distributed import shard_bounds
    >>> shard_bounds(8, 2)
    [(0, 4), (4, 8)]
    """
    base, extra = divmod(size, world)
    bounds, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


# -- which process this is ---------------------------------------------------------------------
@dataclass(frozen=True)
class RankInfo:
    """A process of a distributed fit: its ``rank`` of ``world``, and its ``local_rank`` on its
    machine (``LOCAL_RANK``, set by ``torchrun``; the GPU it uses)."""

    rank: int
    world: int
    local_rank: int


def check_devices(devices: Any) -> None:
    """Refuse a ``devices=`` that is not ``None`` or a positive integer."""
    if devices is None:
        return
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(
            f"devices must be a positive integer (the number of processes, one per GPU or a "
            f"share of the CPU) or None, got {devices!r}"
        )


def current(devices: int | None) -> RankInfo | None:
    """This process's rank when ``fit`` runs inside an initialised process group of several
    processes (``torchrun``, ``srun``, :func:`launch`); ``None`` otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    world = dist.get_world_size()
    if devices is not None and devices not in (1, world):
        raise ValueError(
            f"fit was called with devices={devices} inside a process group of {world} "
            f"processes (torchrun or srun started them): it runs as one of those {world}. Leave "
            "devices unset there, or change the launcher's process count"
        )
    rank = dist.get_rank()
    return RankInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def needs_spawn(devices: int | None) -> bool:
    """Whether ``fit`` must start ``devices`` processes itself (``devices > 1``, no group)."""
    return devices is not None and devices > 1 and current(devices) is None


def rank_device(device: Any, default: torch.device, info: RankInfo) -> torch.device:
    """The device of this process: the CPU, or the GPU of its local rank."""
    dev = default if device is None else torch.device(device)
    backend = dist.get_backend()
    if dev.type == "cuda":
        if dev.index is not None and device is not None and dev.index != info.local_rank:
            raise ValueError(
                f"device={str(device)!r} on the process of local rank {info.local_rank}: in a "
                "distributed fit each process uses the GPU of its local rank; pass device='cuda'"
            )
        count = torch.cuda.device_count()
        if info.local_rank >= count:
            raise RuntimeError(
                f"the process of local rank {info.local_rank} has no GPU ({count} visible on "
                "this machine): start at most one process per GPU (torchrun --nproc-per-node "
                f"{count})"
            )
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    elif backend == "nccl":
        raise ValueError(
            "the process group uses NCCL, which needs GPUs, but the fit runs on the CPU: pass "
            "device='cuda', or create the group with dist.init_process_group('gloo')"
        )
    return dev


def shared_seed(seed: int | None) -> int:
    """``seed``, or (``None``) a seed drawn by process 0 and sent to every process."""
    if seed is not None:
        return int(seed)
    value = torch.tensor(
        [int.from_bytes(os.urandom(7), "little") if dist.get_rank() == 0 else 0], dtype=torch.int64
    )
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.broadcast(value, src=0)
    return int(value.item())


# -- the loader ----------------------------------------------------------------------------------
def check_shardable(loader: Iterable, world: int) -> None:
    """Refuse, with the fix, a ``train_loader`` whose batches cannot be split over ``world``
    processes."""
    head = f"devices={world}: "
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"{head}train_loader is a {type(loader).__name__}, not a DataLoader, so fit cannot "
            f"split its batches; {_LOADER_FIX}"
        )
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError(
            f"{head}train_loader reads an IterableDataset, whose examples have no indices to "
            f"split; {_LOADER_FIX}"
        )
    if loader.batch_sampler is None:
        raise ValueError(
            f"{head}train_loader has batch_size=None (no batches to split); {_LOADER_FIX}"
        )
    samplers = (loader.sampler, getattr(loader.batch_sampler, "sampler", None))
    if any(isinstance(s, DistributedSampler) for s in samplers):
        raise ValueError(
            f"{head}train_loader has a DistributedSampler: pass the undivided loader instead; fit "
            "gives each process its share of every batch itself (with a DistributedSampler the "
            "data would be split twice)"
        )
    size = loader.batch_size
    if size is None:
        return  # a custom batch sampler: each batch is checked as it comes
    if size < world:
        raise ValueError(
            f"{head}batch_size={size} is smaller than the number of processes: each needs at "
            f"least one example of every batch. batch_size is the global batch, split across "
            f"the processes: use batch_size >= {world}"
        )
    try:
        count = len(loader.sampler)  # type: ignore[arg-type]
    except TypeError:
        return
    last = count % size
    if not loader.drop_last and 0 < last < world:
        raise ValueError(
            f"{head}the last batch of every epoch has {last} example(s), fewer than the "
            f"{world} processes, each of which needs at least one: pass drop_last=True to the "
            f"DataLoader, or a batch size that leaves at least {world} examples in the last batch"
        )


class ShardedBatchSampler:
    """The share of process ``rank`` of every batch of ``batch_sampler``.

    Every process iterates the same ``batch_sampler``; draws it makes from torch's global
    generator come from a generator shared by the processes (seeded from ``seed`` and the pass),
    so that every process sees the same global batches.
    """

    def __init__(self, batch_sampler: Iterable, rank: int, world: int, seed: int) -> None:
        self.batch_sampler, self.rank, self.world, self.seed = batch_sampler, rank, world, seed
        #: passes started (the epoch of the next one)
        self.passes = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        state = torch.Generator().manual_seed(_derive(self.seed, 1, self.passes)).get_state()
        self.passes += 1
        batches = iter(self.batch_sampler)
        while True:
            outer = torch.get_rng_state()
            torch.set_rng_state(state)
            try:
                batch = next(batches, None)
            finally:
                state = torch.get_rng_state()
                torch.set_rng_state(outer)
            if batch is None:
                return
            batch = list(batch)
            if len(batch) < self.world:
                raise ValueError(
                    f"a batch of {len(batch)} example(s) cannot be split across {self.world} "
                    "processes, each of which needs at least one: use a larger batch size, or "
                    "drop_last=True for a short last batch"
                )
            start, stop = shard_bounds(len(batch), self.world)[self.rank]
            yield batch[start:stop]


class ShardedLoader:
    """``loader``'s batches, this process's share of each (:class:`ShardedBatchSampler`); its
    other attributes (``dataset``, ``generator``, ``sampler``...) are ``loader``'s, so that the
    checkpoint saves and restores the same generators as on one process. At the start of every
    pass it seeds the global generators with :func:`rank_seed`."""

    def __init__(self, loader: DataLoader, info: RankInfo, seed: int) -> None:
        check_shardable(loader, info.world)
        self.loader, self.info, self.seed = loader, info, seed
        self.shards = ShardedBatchSampler(loader.batch_sampler, info.rank, info.world, seed)
        options: dict[str, Any] = {
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "generator": loader.generator,
            "persistent_workers": loader.persistent_workers,
        }
        if loader.num_workers:
            options["prefetch_factor"] = loader.prefetch_factor
        self.inner = DataLoader(loader.dataset, batch_sampler=self.shards, **options)

    @property
    def passes(self) -> int:
        return self.shards.passes

    @passes.setter
    def passes(self, value: int) -> None:
        self.shards.passes = value

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        pyro.set_rng_seed(rank_seed(self.seed, self.info.rank, self.shards.passes))
        return iter(self.inner)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)


# -- one step ------------------------------------------------------------------------------------
class GradientSync:
    """The communication of a distributed SVI step and epoch (see the module docstring).

    :meth:`hold` before ``loss.backward()`` takes the running sums of the natural-step gates out
    of their ``.grad``; :meth:`reduce` after it averages the new gradients (weights: the shares'
    sizes) and the loss in one all-reduce and puts the sums back, plus the average.
    """

    def __init__(self, bnet: nn.Module, gate_ids: set[int], info: RankInfo, *, sync_bn: bool):
        self.params = [p for p in bnet.parameters() if p.requires_grad]
        self.gates = [p for p in self.params if id(p) in gate_ids]
        self.rank, self.world, self.sync_bn = info.rank, info.world, sync_bn
        dtype = torch.float32
        for p in self.params:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = dtype

    def hold(self) -> list[torch.Tensor | None]:
        held = [p.grad for p in self.gates]
        for p in self.gates:
            p.grad = None
        return held

    def reduce(
        self, held: list[torch.Tensor | None], loss: torch.Tensor, nll: torch.Tensor, size: int
    ) -> tuple[float, float]:
        """Average the gradients of this step over the processes; returns the loss and NLL of
        the global batch."""
        device = loss.device
        weight = float(size)
        parts, flags = [], []
        for p in self.params:
            if p.grad is None:
                parts.append(torch.zeros(p.numel(), dtype=self.dtype, device=device))
                flags.append(0.0)
            else:
                parts.append(p.grad.detach().reshape(-1).to(self.dtype) * weight)
                flags.append(1.0)
        tail = torch.tensor([*flags, weight], dtype=self.dtype, device=device)
        values = torch.stack([loss.detach(), nll.detach()]).to(self.dtype) * weight
        flat = torch.cat([*parts, tail, values])
        dist.all_reduce(flat)
        count = len(self.params)
        total = flat[-3]
        flags_all = flat[-3 - count : -3].tolist()
        flat = flat / total
        offset = 0
        for p, flag in zip(self.params, flags_all, strict=True):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype) if flag > 0 else None
            offset += n
        for p, before in zip(self.gates, held, strict=True):
            if before is not None:
                p.grad = before if p.grad is None else before + p.grad
        loss_value, nll_value = flat[-2:].tolist()
        return loss_value, nll_value

    def sum(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the processes, in place (the NLLs of the gate tests)."""
        dist.all_reduce(tensor)

    def end_of_epoch(self, bnet: nn.Module) -> None:
        """Average the BatchNorm running statistics over the processes (per-device BatchNorm),
        then check that the parameters are the same on every process."""
        if not self.sync_bn:
            stats = [
                buf
                for m in bnet.modules()
                for name in ("running_mean", "running_var")
                if isinstance(buf := getattr(m, name, None), torch.Tensor)
                and buf.is_floating_point()
            ]
            if stats:
                flat = torch.cat([b.reshape(-1) for b in stats]) / self.world
                dist.all_reduce(flat)
                offset = 0
                for b in stats:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
        with torch.no_grad():
            mine = torch.cat([p.detach().reshape(-1).to(self.dtype) for p in self.params])
            first = mine.clone()
            dist.broadcast(first, src=0)
            differ = torch.zeros(1, device=mine.device)
            differ += float(not torch.equal(mine, first))
            dist.all_reduce(differ)
        if differ.item():
            raise RuntimeError(
                "the parameters differ between the processes of a distributed fit after an "
                "epoch: a step was not applied alike everywhere (non-deterministic kernels, or a "
                "parameter changed outside fit). Please report it with the network"
            )


# -- synchronized BatchNorm ------------------------------------------------------------------------
def check_sync_batchnorm(sync: bool, devices: int | None, dev_type: str | None) -> None:
    """Refuse ``sync_batchnorm=True`` where it cannot work."""
    if not sync:
        return
    if dev_type != "cuda":
        raise ValueError(
            "sync_batchnorm=True uses torch.nn.SyncBatchNorm, which runs on GPUs only: pass "
            "device='cuda', or leave sync_batchnorm=False (each process normalises with its "
            "share's statistics; the running statistics are averaged after every epoch)"
        )


def to_sync_batchnorm(bnet: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every BatchNorm of ``bnet`` for a ``torch.nn.SyncBatchNorm`` holding the same
    parameters, buffers and hooks (the gate hooks); :func:`restore_batchnorm` swaps them back."""
    swapped = []
    for parent in list(bnet.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, _BN_TYPES):
                continue
            sync = nn.SyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            for key in ("weight", "bias"):
                if getattr(child, key, None) is not None:
                    setattr(sync, key, getattr(child, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(child, key, None) is not None:
                    setattr(sync, key, getattr(child, key))
            sync._forward_hooks = child._forward_hooks
            sync._forward_pre_hooks = child._forward_pre_hooks
            sync.train(child.training)
            setattr(parent, name, sync)
            swapped.append((parent, name, child))
    return swapped


def restore_batchnorm(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, name, original in swapped:
        setattr(parent, name, original)


# -- starting processes ----------------------------------------------------------------------------
#: the most seconds a process of :func:`launch` waits, after its result, for its peers' teardown
RELEASE_SECONDS = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(
    index: int,
    world: int,
    port: int,
    backend: str,
    threads: int | None,
    job: bytes,
    results: Any,
    release: Any,
) -> None:
    """One process of :func:`launch`: join the group, run ``fn(*args)`` (pickled in ``job``),
    tear the group down, send what it returned (or the exception it raised) to the parent
    through ``results``, a queue between this call's own processes (no file is written or read),
    and wait for ``release`` (an event the parent sets once every process has sent its result)
    before it ends."""
    fn, args = pickle.loads(job)
    os.environ.update(
        RANK=str(index), WORLD_SIZE=str(world), LOCAL_RANK=str(index),
        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=index, world_size=world
    )
    try:
        payload = pickle.dumps(fn(*args))
        # every process done with its collectives before any tears its group down (a process
        # that destroyed its group while a peer still closed its connections aborted once in
        # about 40 runs of the tests, "terminate called without an active exception")
        dist.barrier()
    except BaseException as exc:
        try:
            payload = pickle.dumps(exc)
        except Exception:  # an exception that does not pickle: its text
            payload = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
        results.put((index, False, payload))
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    results.put((index, True, payload))
    # and none ends while a peer still tears its group down (process 0's end takes the group's
    # store with it; with the barrier alone, one run of the whole suite still aborted so): the
    # parent sets ``release`` once every process has sent its result, after every teardown
    release.wait(timeout=RELEASE_SECONDS)


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: tuple = (),
    *,
    backend: str = "gloo",
    threads: int | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` new local processes joined in a ``torch.distributed``
    process group (``backend``: ``"gloo"`` for CPUs, ``"nccl"`` for GPUs); returns what each
    process returned, by rank. ``fn`` and ``args`` are pickled (``fn`` must be importable:
    a module-level function). An exception in a process is raised here (the first to fail).
    What the processes return travels back through a pipe between this call's own processes;
    nothing is written to or read from disk.

    ``threads``: torch's CPU threads in each process (default: torch's choice). The processes
    are started with ``spawn``: a script that calls this must do so under
    ``if __name__ == "__main__":``.
    """
    try:
        # plain pickle: tensors travel by value, not as shared-memory handles
        job = pickle.dumps((fn, args))
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TypeError(
            f"starting {nprocs} processes needs the function and its arguments (bnet, the "
            f"loaders) to be picklable, and they are not ({type(exc).__name__}: {exc}). Use "
            "module-level functions (no lambdas) in the loader's collate_fn / dataset, or "
            "start the processes yourself with torchrun and call fit inside them (see "
            "bayesprune.distributed)"
        ) from exc
    spawn = torch.multiprocessing.get_context("spawn")
    results, release = spawn.SimpleQueue(), spawn.Event()
    context = torch.multiprocessing.start_processes(
        _child,
        args=(nprocs, _free_port(), backend, threads, job, results, release),
        nprocs=nprocs,
        join=False,
        start_method="spawn",
    )
    returned: dict[int, Any] = {}
    failed: dict[int, BaseException] = {}

    def drain() -> None:
        while not results.empty():
            index, ok, payload = results.get()
            (returned if ok else failed)[index] = pickle.loads(payload)
        if len(returned) + len(failed) == nprocs:  # every group torn down: the processes may end
            release.set()

    try:
        while True:
            drain()  # before join: a child blocks on a full pipe until it is read
            try:
                if context.join(timeout=0.05):
                    break
            except torch.multiprocessing.ProcessRaisedException as exc:
                drain()
                if exc.error_index in failed:
                    raise failed[exc.error_index] from exc
                raise
        drain()
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
            process.join()
    missing = sorted(set(range(nprocs)) - set(returned))
    if missing:
        raise RuntimeError(f"processes {missing} of the distributed fit ended without a result")
    return [returned[r] for r in range(nprocs)]


def fit_worker(fit: Callable[..., Any], bnet: nn.Module, train_loader: Any, kwargs: dict) -> Any:
    """What each process of ``fit(..., devices=N)`` runs: the fit as its rank; process 0 returns
    the fitted state, the history and the warnings for the calling process."""
    with warnings.catch_warnings(record=True) as caught:
        result = fit(bnet, train_loader, **kwargs)
    if dist.get_rank() != 0:
        return None
    return {
        "state": {k: v.detach().cpu() for k, v in bnet.state_dict().items()},
        "grads": {
            k: p.grad.detach().cpu() for k, p in bnet.named_parameters() if p.grad is not None
        },
        "num_data": bnet.num_data,
        "input_shape": bnet.input_shape,
        "result": result,
        "warnings": [(w.category, str(w.message)) for w in caught],
    }


def spawn_fit(
    fit: Callable[..., Any],
    bnet: nn.Module,
    train_loader: Any,
    kwargs: dict[str, Any],
    *,
    devices: int,
    device: torch.device,
) -> Any:
    """``fit(bnet, train_loader, **kwargs)`` on ``devices`` new local processes; puts process
    0's fitted parameters into ``bnet`` (on ``device``) and returns its history."""
    check_shardable(train_loader, devices)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if devices > count:
            raise ValueError(
                f"devices={devices}, but {count} GPU(s) are visible on this machine: pass "
                f"devices={count} or fewer, or start processes on several machines with "
                "torchrun (see bayesprune.distributed)"
            )
        backend, threads = "nccl", None
    else:
        backend, threads = "gloo", max(1, torch.get_num_threads() // devices)
    outs = launch(
        fit_worker, devices, (fit, bnet, train_loader, dict(kwargs, devices=devices)),
        backend=backend, threads=threads,
    )  # fmt: skip
    payload = outs[0]
    bnet.to(device)
    with torch.no_grad():
        bnet.load_state_dict(payload["state"])
    params = dict(bnet.named_parameters())
    for name, p in params.items():
        grad = payload["grads"].get(name)
        p.grad = None if grad is None else grad.to(device=p.device, dtype=p.dtype)
    bnet.set_num_data(payload["num_data"])  # a prior that depends on N gets it, as in a fit
    bnet.input_shape = payload["input_shape"]
    for category, message in payload["warnings"]:
        warnings.warn(message, category, stacklevel=3)  # fit's caller
    return payload["result"]
