r"""Turning a plain ``nn.Module`` into a Bayesian one: :func:`bayesianize`, and :func:`load`.

:func:`bayesianize` deep-copies the user's network (the original is never mutated), swaps its
supported layers for the Bayesian layers of :mod:`bayesprune.layers` (posterior means initialised
from the trained weights), and wraps the result in a :class:`~bayesprune.BayesianModule`
(:mod:`bayesprune.module`: the fast training path, the Pyro model and guide, the posterior
summaries). It runs in phases, one private function each, called in this order:

1. ``_check_options``: the arguments that do not depend on the network (likelihood, noise scale,
   estimator, initial sd, variational family, priors);
2. ``_resolve_targets``: the layers to make Bayesian (``layers=``, ``skip=``, the prior dict's
   keys, else every supported layer, with a warning naming the modules whose parameters stay
   deterministic);
3. ``_check_targets``: refuse what the fit cannot handle (tensors that are not float32, tied
   weights or one layer under two names, frozen layers);
4. ``_find_gate_points``: where each layer's node multiplier acts, found with :mod:`torch.fx` on
   the plain copy (after a BatchNorm that directly follows the layer, and after a ReLU used only
   there);
5. ``_swap_layers``: the Bayesian twins replace the chosen layers of the copy;
6. ``_place_gates``: forward hooks that apply the multipliers at the points found in phase 4.

:func:`load` rebuilds a module saved by :meth:`~bayesprune.BayesianModule.save`: the file's
config (:mod:`bayesprune.io`), :func:`bayesianize` of the given network with it, then the file's
tensors. (:class:`~bayesprune.BayesianModule` and :class:`~bayesprune.module.RegressionPrediction`
live in :mod:`bayesprune.module`; they are re-exported here, where they used to be.)

Layer coverage
--------------
=====================================================  ==============================================
layer type                                             treatment
=====================================================  ==============================================
``nn.Linear``                                          Bayesian (node = output feature)
``nn.Conv1d``                                          Bayesian (node = output channel)
``nn.Conv2d``                                          Bayesian (node = filter); any stride, padding,
                                                       dilation, groups, padding mode
``nn.MultiheadAttention``                              Bayesian (node = head: its q, k, v rows and
                                                       out_proj columns; :mod:`bayesprune.attention`);
                                                       not with kdim/vdim, add_bias_kv, add_zero_attn
``nn.TransformerEncoderLayer`` / ``TransformerEncoder``  their attention and Linear layers as above
                                                       (node of ``linear1`` = feed-forward unit);
                                                       LayerNorms deterministic
``nn.BatchNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm``  deterministic, parameters learned as point
                                                       estimates; a gate acts after a BatchNorm that
                                                       directly follows its layer (and after a
                                                       ``nn.ReLU``/``LeakyReLU`` used only there)
activations, pooling, ``Flatten``, ``Dropout``         deterministic, no parameters
other layers with parameters (``Conv3d``,              stay deterministic (point estimates) with a
``ConvTranspose*``, ``Embedding``, RNNs,               warning naming them; naming one in ``layers=``
subclasses of Linear/Conv...)                          is an error
=====================================================  ==============================================

Each row is exercised by a test in ``tests/test_bayesianize.py``.

Example
-------
>>> import torch
>>> import bayesprune as bp
>>> from bayesprune.models import lenet_300_100
>>> bnet = bp.bayesianize(lenet_300_100(in_features=64))  # the default prior: node spike-and-slab
>>> sorted(bnet.inclusion_probs())
['1', '3', '5']
>>> bnet.predict(torch.randn(2, 64), num_samples=4).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from . import attention  # noqa: F401  (registers nn.MultiheadAttention's Bayesian twin)
from ._utils import modes_kept, resolve_device
from .io import mismatch, read_config, restore_state
from .layers import INIT_SCALE, WEIGHT_SD_FAMILIES, BayesianLayer, bayesian_layer_for
from .module import REPARAMS, BayesianModule, RegressionPrediction
from .priors import Prior, default_prior, prior_from_dict
from .registry import prepare_blocks, symbolic_trace

# BayesianModule and RegressionPrediction are defined in bayesprune.module
__all__ = ["BayesianModule", "RegressionPrediction", "bayesianize", "load"]

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LIKELIHOODS = ("categorical", "gaussian")


def bayesianize(
    net: nn.Module,
    prior: Prior | Mapping[str, Prior] | None = None,
    layers: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    likelihood: Literal["categorical", "gaussian"] = "categorical",
    *,
    noise_scale: float | None = None,
    init_scale: float = INIT_SCALE,
    num_classes: int | None = None,
    reparam: Literal["local", "shared", "auto"] = "local",
    weight_sd: Literal["per_weight", "rank1"] = "per_weight",
) -> BayesianModule:
    r"""Make the ``Linear`` / ``Conv1d`` / ``Conv2d`` layers of ``net`` Bayesian.

    Parameters
    ----------
    net
        Any ``nn.Module`` (Sequential or not, residual nets included). It is deep-copied and never
        modified; posterior means start at its weights (so a pretrained net starts near its accuracy).
    prior
        A :mod:`bayesprune.priors` object for every Bayesian layer, or a dict layer path ->
        prior (its keys are then the Bayesian layers unless ``layers`` is given). Default
        :func:`bayesprune.priors.default_prior`: node spike-and-slab, prior inclusion 0.1, with a
        price per parameter and per training example that :func:`bayesprune.fit` binds to the
        data size (``SpikeAndSlab(level="node", price_per_example=2e-6)``; before a fit,
        ``bnet.set_num_data(N)`` binds it for a loop of your own).
    layers
        Paths (``net.named_modules()`` names) of the layers to make Bayesian; default all supported.
    skip
        Paths to leave deterministic.
    likelihood
        ``"categorical"`` (outputs are logits) or ``"gaussian"`` (regression).
    noise_scale
        Fixed observation-noise sd of the Gaussian likelihood; ``None`` learns it (point estimate).
    init_scale
        Initial posterior sd relative to the layer's weight RMS.
    num_classes
        Output width; inferred from the last Linear/Conv layer when omitted.
    reparam
        Training-path estimator of the expected log-likelihood; switch later with
        :meth:`BayesianModule.set_reparam`.

        * ``"local"``: local reparameterization (Kingma, Salimans and Welling 2015), one noise
          draw per pre-activation, two matmuls / convolutions per layer. For a ``Linear`` layer
          it is unbiased for the ELBO, with the lowest variance. For a convolution it is an
          approximation: all positions of one example share one weight draw under :math:`q`,
          and independent noise per position keeps each output's marginal law but drops their
          correlation, so the objective is not exactly the ELBO.
        * ``"shared"``: one weight draw per minibatch (Bayes by Backprop), unbiased for every
          layer type: the deterministic net's matmul cost plus one draw of the weights. Node
          gates and scales are still drawn per example, as under ``"local"``.
        * ``"auto"``: local reparameterization where it is exact (a ``Linear`` layer reading one
          vector per example), one weight draw per minibatch elsewhere (convolutions, ``Linear``
          layers applied to sequences). Unbiased everywhere, and the cheaper estimator for each:
          a convolution has far more pre-activations per batch than weights, an MLP's layer
          fewer.
    weight_sd
        Variational family of the base weights' standard deviations. ``"per_weight"`` (mean
        field): one free :math:`\sigma_{ji}` per weight. ``"rank1"``: :math:`\sigma_{ji} = e^{a_j}
        e^{b_i}`, one factor per node :math:`j` and one per input position :math:`i` (shared by
        the layer's nodes), so a layer has about as many variational parameters as weights. With
        local reparameterization the output variance is then
        :math:`e^{2a_j}\,\mathrm{op}(x^2, e^{2b})`: one single-output matmul / convolution instead
        of a second full-width one, the step's main cost. Weight-level spike-and-slab needs the
        full variance matrix and gains no speed from it.

    Raises
    ------
    KeyError
        A name in ``layers`` / ``skip`` / the prior dict is not a module of ``net``.
    TypeError
        ``net`` is not a module, a prior is not a prior, or a requested layer has an unsupported type.
    ValueError
        No supported layer is left to make Bayesian, or the likelihood is unknown.
    """
    prior, per_layer = _check_options(
        net, prior, likelihood, noise_scale, reparam, init_scale, weight_sd
    )
    modules = dict(net.named_modules())
    chosen = _resolve_targets(net, modules, per_layer, layers, skip)
    _check_targets(net, modules, chosen)
    if num_classes is None:
        num_classes = _infer_num_classes(net)
    template = copy.deepcopy(net)  # the plain skeleton of mean_module and dense_module
    work = copy.deepcopy(net)
    gates = _find_gate_points(work, chosen)
    work, priors = _swap_layers(work, chosen, prior, per_layer, init_scale, weight_sd)
    _place_gates(work, chosen, gates)
    prepare_blocks(work)  # fused transformer paths would read the replaced layers' tensors
    bnet = BayesianModule(
        work, template, priors, likelihood, num_classes, noise_scale, gates.batchnorm
    )
    bnet.training = net.training  # the wrapper's flag only: the copied layers keep their own
    bnet.set_reparam(reparam)
    dev = next((p.device for p in net.parameters()), torch.device("cpu"))
    return bnet.to(dev)


# -- the phases of bayesianize, in the order it calls them ------------------------------------
def _check_options(
    net: nn.Module,
    prior: Prior | Mapping[str, Prior] | None,
    likelihood: str,
    noise_scale: float | None,
    reparam: str,
    init_scale: float,
    weight_sd: str,
) -> tuple[Prior | None, dict[str, Prior] | None]:
    """Phase 1: the arguments of :func:`bayesianize` that do not depend on the network's layers.

    Returns ``(prior, per_layer)``: the prior of every layer (the default filled in), and the
    prior dict when one was given (else ``None``).
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"bayesianize expects a torch.nn.Module, got {type(net).__name__}")
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
    if noise_scale is not None and not (isinstance(noise_scale, (int, float)) and noise_scale > 0):
        raise ValueError(f"noise_scale must be a positive number or None, got {noise_scale!r}")
    if reparam not in REPARAMS:
        raise ValueError(f"reparam must be one of {REPARAMS}, got {reparam!r}")
    if init_scale <= 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    if weight_sd not in WEIGHT_SD_FAMILIES:
        raise ValueError(
            f"weight_sd must be one of {WEIGHT_SD_FAMILIES} (one sd per weight, or rank one: "
            f"node factor x input factor), got {weight_sd!r}"
        )
    if prior is None:
        prior = default_prior()
    per_layer = dict(prior) if isinstance(prior, Mapping) else None
    for p in per_layer.values() if per_layer is not None else [prior]:
        if not isinstance(p, Prior):
            raise TypeError(
                f"prior must be a bayesprune.priors object such as bp.priors.SpikeAndSlab(), got {p!r}"
            )
    return prior, per_layer


def _resolve_targets(
    net: nn.Module,
    modules: dict[str, nn.Module],
    per_layer: dict[str, Prior] | None,
    layers: Iterable[str] | None,
    skip: Iterable[str] | None,
) -> list[str]:
    """Phase 2: the paths of the layers to make Bayesian, in the order given (``layers=``, the
    prior dict) or in module order; warns once about the modules whose own parameters stay
    deterministic when the layers are not named."""
    if any(isinstance(m, BayesianLayer) for m in modules.values()):
        raise TypeError("net already contains Bayesian layers; pass the plain network")

    def check_names(names: Iterable[str], what: str) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        bad = [n for n in names if n not in modules]
        if bad:
            supported = [n for n, m in modules.items() if bayesian_layer_for(m) is not None]
            raise KeyError(
                f"{what} names modules that are not in the network: {bad}; "
                f"layers that can be made Bayesian: {supported}"
            )
        return names

    skip_set = set(check_names(skip, "skip")) if skip is not None else set()
    source = "layers="
    if layers is None and per_layer is not None:
        layers, source = list(per_layer), "the prior dict"
    if layers is not None:
        requested = check_names(layers, "layers" if source == "layers=" else "prior")
        for n in requested:
            if bayesian_layer_for(modules[n]) is None:
                raise TypeError(
                    f"layer {n!r} is a {type(modules[n]).__name__}; bayesprune makes only nn.Linear, "
                    f"nn.Conv1d, nn.Conv2d and nn.MultiheadAttention (and registered layers) "
                    f"Bayesian. Leave it out of {source} (it then stays deterministic)"
                )
        chosen = [n for n in requested if n not in skip_set]
    else:
        chosen = [
            n for n, m in modules.items() if bayesian_layer_for(m) is not None and n not in skip_set
        ]
        # a layer inside a Bayesian one is part of it (an attention's out_proj)
        chosen = [n for n in chosen if not any(n.startswith(f"{c}.") for c in chosen if c)]
        # one warning for all of them, each with the parameters it holds itself: a container
        # such as a transformer encoder may hold one (a position embedding) while the Linear
        # layers inside it do become Bayesian
        kept = {
            n: [p for p, _ in m.named_parameters(recurse=False)]
            for n, m in modules.items()
            if n
            and _unsupported_with_params(m)
            and n not in skip_set
            and not any(n.startswith(f"{c}.") for c in chosen if c)
        }
        if kept:
            shown = ", ".join(
                f"{n!r} ({type(modules[n]).__name__}: {', '.join(ps)})"
                for n, ps in list(kept.items())[:8]
            )
            more = f" and {len(kept) - 8} more" if len(kept) > 8 else ""
            names = list(kept) if len(kept) <= 8 else "[their names]"
            warnings.warn(
                "bayesianize makes only nn.Linear, nn.Conv1d, nn.Conv2d and nn.MultiheadAttention "
                "(and registered layers) Bayesian; these modules "
                "hold parameters of their own, which stay deterministic (learned as point "
                f"estimates): {shown}{more}. Pass skip={names} to silence this warning",
                UserWarning,
                stacklevel=3,  # bayesianize's caller
            )
    if per_layer is not None:
        check_names(per_layer, "prior")
        missing = [n for n in chosen if n not in per_layer]
        if missing:
            raise KeyError(f"the prior dict has no prior for Bayesian layers {missing}")
    if not chosen:
        raise ValueError(
            "no layer to make Bayesian: bayesianize supports nn.Linear, nn.Conv1d and nn.Conv2d "
            f"and found none{' outside skip=' if skip_set else ''} in {type(net).__name__}"
        )
    return chosen


def _unsupported_with_params(module: nn.Module) -> bool:
    """A non-container module holding parameters of its own that we cannot make Bayesian."""
    if isinstance(module, _NORM_TYPES) or bayesian_layer_for(module) is not None:
        return False
    return any(True for _ in module.parameters(recurse=False))


def _check_targets(net: nn.Module, modules: Mapping[str, nn.Module], chosen: list[str]) -> None:
    """Phase 3: refuse what the fit cannot handle: tensors that are not float32, a chosen layer
    with tied weights or under two names, a chosen layer with frozen parameters."""
    _check_plain_float32(net)
    _check_untied(net, modules, chosen)
    frozen = [n for n in chosen if any(not p.requires_grad for p in modules[n].parameters())]
    if frozen:
        raise ValueError(
            f"layers {frozen} have frozen parameters (requires_grad=False), and bayesianize would "
            "learn a posterior over them anyway. Unfreeze them (requires_grad_(True)) to make them "
            f"Bayesian, or pass skip={frozen} to keep them deterministic and frozen"
        )


def _check_plain_float32(net: nn.Module) -> None:
    """A ``TypeError`` unless every floating parameter and buffer of ``net`` is float32."""
    tensors = [*net.parameters(), *net.buffers()]
    found = {t.dtype for t in tensors if t.is_floating_point()} - {torch.float32}
    if found:
        raise TypeError(
            f"bayesianize fits float32 networks, and {type(net).__name__} holds "
            f"{', '.join(sorted(str(d) for d in found))} tensors; convert it with net.float() "
            "(and feed float32 inputs)"
        )


def _check_untied(net: nn.Module, modules: Mapping[str, nn.Module], chosen: Iterable[str]) -> None:
    """A ``ValueError`` when a layer to be made Bayesian is registered under two names, or shares
    a parameter with another module (tied weights): each name would get its own posterior of one
    set of weights (or one of them none), and :meth:`BayesianModule.mean_module`, ``prune`` and
    ``certify`` would re-tie them, so the exported net would differ from the fitted one."""
    aliases: dict[int, list[str]] = {}
    for name, m in net.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(name)
    owners: dict[int, list[str]] = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for n in chosen:
        names = aliases[id(modules[n])]
        if len(names) > 1:
            raise ValueError(
                f"layer {n!r} is registered under {len(names)} names {names} (one module, two "
                "attributes); bayesianize would give it a posterior under one name only. Register "
                "it once and call it wherever it is used, or keep it deterministic with "
                f"skip=[{n!r}]"
            )
        for pname, p in modules[n].named_parameters(recurse=False):
            tied = [o for o in owners[id(p)] if o != (f"{n}.{pname}" if n else pname)]
            if tied:
                raise ValueError(
                    f"parameter {pname!r} of layer {n!r} is shared with {tied} (tied weights), "
                    "which bayesprune does not support: each layer would get its own posterior of "
                    "the same weights. Untie them (layer.weight = "
                    f"nn.Parameter(layer.weight.detach().clone())) or keep layer {n!r} and the "
                    f"layers it shares with deterministic with skip=[{n!r}, ...]"
                )


def _infer_num_classes(net: nn.Module) -> int | None:
    """Output width of ``net``: the layer that computes its output when torch.fx can trace it
    (modules may be registered in any order: a head defined before the body), else the last
    Linear/Conv registered."""
    try:
        graph = symbolic_trace(net).graph
    except Exception:  # untraceable: registration order
        graph = None
    if graph is not None:
        modules = dict(net.named_modules())
        node = next((n.args[0] for n in graph.nodes if n.op == "output"), None)
        for _ in range(16):  # back through flatten / view / activations to the producing layer
            if not isinstance(node, torch.fx.Node):
                break
            if node.op == "call_module":
                m = modules.get(str(node.target))
                if isinstance(m, nn.Linear):
                    return m.out_features
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    return m.out_channels
            node = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
    last = None
    for m in net.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            last = m.out_channels
    return last


class _GatePoints(NamedTuple):
    """Where the node multipliers act (phase 4): layer path -> module path."""

    #: a BatchNorm that alone consumes the layer's output (``BayesianModule.gate_after``)
    batchnorm: dict[str, str]
    #: a ReLU / LeakyReLU after the layer or that BatchNorm, used only there
    activation: dict[str, str]


def _find_gate_points(work: nn.Module, chosen: list[str]) -> _GatePoints:
    """Phase 4: :func:`_gate_points` of the plain copy ``work``, before any layer is swapped; warns
    when ``work`` cannot be traced although it has BatchNorms (the gates then act at the layers'
    outputs)."""
    followers, activations, traced, shared = _gate_points(work, chosen)
    if shared:
        warnings.warn(
            f"{', '.join(sorted(shared))} {'is' if len(shared) == 1 else 'are'} called more than "
            "once, and a BatchNorm follows a call: the node gates act at the layer's output, "
            "where they reach every call, so gated-off channels are not exactly zero after those "
            "BatchNorms and the pruned network, which drops the channels there too, differs from "
            "the posterior-mean network; give each call a layer of its own to prune it exactly",
            UserWarning,
            stacklevel=3,  # bayesianize's caller
        )
    if not traced and any(isinstance(m, _BN_TYPES) for m in work.modules()):
        warnings.warn(
            f"{type(work).__name__} could not be traced with torch.fx, so node gates act at each "
            "layer's output even when a BatchNorm follows it (gated-off channels are then not "
            "exactly zero after the BatchNorm)",
            UserWarning,
            stacklevel=3,  # bayesianize's caller
        )
    return _GatePoints(followers, activations)


def _gate_points(
    net: nn.Module, paths: Iterable[str]
) -> tuple[dict[str, str], dict[str, str], bool, set[str]]:
    r"""Where each layer's node multiplier acts, found with :mod:`torch.fx`.

    Returns ``(bn, act, traced, shared)``: layer path -> a BatchNorm that alone consumes its output, and
    layer path -> a ReLU / LeakyReLU module that alone consumes the output of the layer (or of
    that BatchNorm) and is called nowhere else; for a layer the network calls once (a layer
    called twice keeps its multiplier at its own output; ``shared`` holds those of them that a
    BatchNorm follows). The multiplier acts after the last of these. For
    a multiplier :math:`m \ge 0` and a positively homogeneous activation,
    :math:`\mathrm{relu}(m a) = m\,\mathrm{relu}(a)`, so the forward value is the same, but a gate
    after the ReLU gets a gradient when it is 0 (before the ReLU it would sit on the kink, where the
    derivative is 0 and a dropped node could never tell the loss it is needed).
    """
    paths = set(paths)
    modules = dict(net.named_modules())
    found = []
    # both modes' graphs (fx bakes `if self.training` in): a point holds only if it holds in both,
    # the rule bayesprune.prune applies to BatchNorms
    for training in (False, True):
        with modes_kept(net):
            net.train(training)
            try:
                gm = symbolic_trace(net)
            except Exception:  # any tracing failure: fall back to gating at the layer output
                return {}, {}, False, set()
        found.append(_gate_points_in(gm, modules, paths))
    bn: dict[str, str] = {}
    act: dict[str, str] = {}
    agreed_bn: dict[str, str | None] = {}
    for k in paths:
        # the points of every graph that runs the layer (one graph: LayerDrop skips it in
        # training, or an auxiliary head runs only there) must agree: the BatchNorm on its own,
        # the activation only where the BatchNorm before it agrees too
        runs = [(b, a) for b, a, called, _ in found if k in called]
        bns, acts = {b.get(k) for b, _ in runs}, {a.get(k) for _, a in runs}
        if len(bns) != 1:
            continue
        agreed_bn[k] = next(iter(bns))
        if agreed_bn[k] is not None:
            bn[k] = agreed_bn[k]
        if len(acts) == 1 and None not in acts:
            act[k] = next(iter(acts))
    # a module that would be the gate point of two layers (one per mode) is nobody's
    for points in (bn, act):
        claimed: dict[str, int] = {}
        for v in points.values():
            claimed[v] = claimed.get(v, 0) + 1
        for k in [k for k, v in points.items() if claimed[v] > 1]:
            del points[k]
    act = {k: v for k, v in act.items() if bn.get(k) == agreed_bn[k]}
    return bn, act, True, set().union(*(f[3] for f in found))


def _gate_points_in(
    gm: torch.fx.GraphModule, modules: dict[str, nn.Module], paths: set[str]
) -> tuple[dict[str, str], dict[str, str], set[str], set[str]]:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def sole_module_user(node, types):
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            if isinstance(modules.get(users[0].target), types) and calls[users[0].target] == 1:
                return users[0]
        return None

    bn: dict[str, str] = {}
    act: dict[str, str] = {}
    shared: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in paths:
            continue
        if calls[node.target] > 1:
            # its gate stays at its output, where it acts on every call: a BatchNorm or ReLU
            # after one call would leave the others ungated
            users = list(node.users)
            if any(
                u.op == "call_module" and isinstance(modules.get(u.target), _BN_TYPES)
                for u in users
            ):
                shared.add(node.target)
            continue
        cur = node
        user = sole_module_user(cur, _BN_TYPES)
        if user is not None:
            bn[node.target] = user.target
            cur = user
        user = sole_module_user(cur, (nn.ReLU, nn.LeakyReLU))
        if user is not None:
            act[node.target] = user.target
    return bn, act, set(calls), shared


def _swap_layers(
    work: nn.Module,
    chosen: list[str],
    prior: Prior | None,
    per_layer: dict[str, Prior] | None,
    init_scale: float,
    weight_sd: str,
) -> tuple[nn.Module, dict[str, Prior]]:
    """Phase 5: replace each chosen layer of ``work`` by its Bayesian twin (in place; a network
    that is a single layer is replaced whole). Returns the network and each layer's prior."""
    work_modules = dict(work.named_modules())
    priors: dict[str, Prior] = {}
    for n in chosen:
        priors[n] = per_layer[n] if per_layer is not None else prior
        old = work_modules[n]
        new = bayesian_layer_for(old).from_module(old, priors[n], init_scale, weight_sd)
        if n == "":  # the network is a single supported layer
            work = new
        else:
            parent_name, _, child = n.rpartition(".")
            setattr(work_modules[parent_name] if parent_name else work, child, new)
    return work, priors


def _place_gates(work: nn.Module, chosen: list[str], gates: _GatePoints) -> None:
    """Phase 6: tell each Bayesian layer where its node multiplier acts, and hook the multiplier
    onto that module's output (:class:`_GateAfter`)."""
    work_modules = dict(work.named_modules())
    for n in chosen:
        layer = work_modules[n]
        bn = gates.batchnorm.get(n)
        if (
            bn is not None
            and work_modules[bn].weight is None
            and layer.mean_weights()[2] is not None
        ):
            raise ValueError(
                f"layer {n!r} is followed by BatchNorm {bn!r} with affine=False, and its prior "
                f"({type(layer.prior).__name__}) scales each node: before that BatchNorm the scale "
                "would be normalised away, after it the posterior-mean network could not hold it. "
                "Use BatchNorm(affine=True) there, or a node SpikeAndSlab prior (the default), "
                f"or keep the layer deterministic with skip=[{n!r}]"
            )
        layer.gate_after = gates.activation.get(n, bn)
        layer.batchnorm_follows = n in gates.batchnorm
        if layer.gate_after is not None:
            work_modules[layer.gate_after].register_forward_hook(_GateAfter(layer))


class _GateAfter:
    """BatchNorm forward hook: multiply the BatchNorm's output by the preceding layer's node multiplier."""

    def __init__(self, layer: BayesianLayer) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        mult = self.layer._mult
        return output if mult is None else self.layer.apply_multiplier(output, mult)


# -- a saved module ------------------------------------------------------------------------------
def load(
    path: str | Path, net: nn.Module, device: str | torch.device | None = None
) -> BayesianModule:
    """Load a :class:`BayesianModule` saved by :meth:`BayesianModule.save`.

    Parameters
    ----------
    path
        The ``.safetensors`` file.
    net
        A plain network of the same architecture (the file holds parameters, not code), e.g. the
        builder call that made the original: ``bp.load("bnet.safetensors", lenet_300_100())``.
    device
        Where to put the result (default CPU).

    Example
    -------
    >>> import tempfile, os, torch
    >>> import bayesprune as bp
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> bnet = bp.bayesianize(net)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     bnet.save(os.path.join(d, "b.safetensors"))
    ...     back = bp.load(os.path.join(d, "b.safetensors"), net)
    >>> torch.equal(back.net[0].weight_loc, bnet.net[0].weight_loc)
    True
    """
    path = Path(path)
    cfg = read_config(path)
    priors = {p: prior_from_dict(spec) for p, spec in cfg["priors"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            bnet = bayesianize(
                net,
                prior=priors,
                likelihood=cfg["likelihood"],
                noise_scale=cfg["noise_scale"],
                num_classes=cfg["num_classes"],
                reparam=cfg.get("reparam", "local"),
                weight_sd=cfg.get("weight_sd", "per_weight"),
            )
        except (TypeError, KeyError, ValueError) as exc:
            msg = exc.args[0] if exc.args else exc
            raise ValueError(
                f"{mismatch(path)}: the file holds Bayesian layers {sorted(priors)}, and for this "
                f"network {msg}. Pass the same architecture that was saved (e.g. the same "
                "builder call)"
            ) from None
    restore_state(bnet, path, cfg)
    return bnet.to(resolve_device(device))
