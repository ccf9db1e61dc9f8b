r"""SNACS: single-shot filter pruning by adaptive conditional mutual information (arXiv 2006.12463).

Ganesh, Blanchard, Corso and Sekeh, "Slimming Neural Networks using Adaptive Connectivity Scores".
For every pair of adjacent prunable layers (parents :math:`\ell`, children :math:`\ell + 1`):

1. **Groups.** The parent nodes (filters) are split into :math:`G` contiguous groups (8 by default).
2. **Adaptive conditional MI.** For every child :math:`j` and group :math:`g`,

   .. math:: c_{gj} = I(X_j; P_{g} \mid P_{-g}) = I(X_j; (P_g, P_{-g})) - I(X_j; P_{-g}),

   estimated on class-balanced examples (``per_class``, about 200-250 per class in the paper) with
   the hash-based EDGE estimator (:func:`edge_mutual_information`, Noshad, Zeng and Hero 2019).
3. **Weight scaling.** The connectivity score of parent :math:`i` (in group :math:`g(i)`) is
   :math:`s_i = \sum_j c_{g(i) j}\, \tilde w_{ij}`, with :math:`\tilde w_{ij}` the min-max-normalised
   mean absolute weight from parent :math:`i` to child :math:`j` (over the kernel / the flattened
   positions).
4. **Upper pruning limits.** For each parent layer, a linear SVM (scikit-learn ``LinearSVC``) is
   trained on the layer's activations with the lowest-scoring fraction :math:`p \in \{0, 0.1, \dots,
   0.9\}` of nodes removed; the layer's limit :math:`u_\ell` is the largest :math:`p` whose held-out
   accuracy is at least :math:`\max - 0.7 (\max - \min)` of the curve.
5. **Sensitivity.** A fraction (``protect_fraction``) of each layer's nodes with the largest
   normalised contribution to the grandchildren, :math:`\sum_j |W^{(\ell+1)}_{j i}| / \max_i(\cdot)`,
   is never pruned.

SNACS's own decision removes, in every layer, the :math:`\lfloor u_\ell\,w_\ell \rfloor` lowest-
scoring unprotected nodes: ``prune(level)`` removes :math:`\min(\lfloor \text{level}\cdot w_\ell\rfloor,
\lfloor u_\ell w_\ell\rfloor)` of them per layer, so ``level`` is a per-layer cap (``level`` :math:`\ge
\max_\ell u_\ell` gives SNACS's single-shot result, :meth:`SNACS.snacs_level`), and candidate sequences
for certification are increasing caps.

What we changed. *Projections*: the paper hashes the raw activation vectors; we hash, for child
:math:`j`, the scalar contributions :math:`P_g = \sum_{i \in g} W_{ji} a_i` of each group and of
the rest (:math:`P_{-g}`), which is what the child actually receives from them (hashing the 30+
dimensional group activations directly needs far more than 2,000 points per estimate). Conv
activations are averaged over space. *EDGE*: random-shift bucket hashing with an ensemble over
five bucket widths around :math:`\epsilon = 2 n^{-1/(2 + d)}` (plain average, not the paper's
optimally weighted ensemble) and a Miller-Madow-type bias correction. The child activation is what
the network passes on from the child layer: its output after the BatchNorm and activation that
follow it alone, the output itself otherwise (the logits, for the output layer).
No fine-tuning is done here (the paper fine-tunes after pruning; :func:`bayesprune.finetune` does).

Example
-------
>>> import torch
>>> from torch import nn
>>> from torch.utils.data import DataLoader, TensorDataset
>>> from bayesprune.baselines import SNACS
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> x = torch.randn(400, 6)
>>> data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=100)
>>> net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
>>> m = SNACS(per_class=100, progress=False).fit(net, data)
>>> sorted(m.scores), len(m.scores["0"])
(['0'], 16)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from ..pruning import dependency_groups
from ..pruning.graph import trace
from ._common import balanced, paired, spatial_mean
from .base import PruningMethod, hidden_layers

# what may follow a child layer before the network passes its output on
_CHILD_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Sigmoid, nn.Identity,
    nn.Dropout,
)  # fmt: skip
_CHILD_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.tanh}
_CHILD_METHODS = {"relu", "tanh", "sigmoid"}


def _child_node(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """``node`` followed through a BatchNorm and / or activation that only it feeds."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if (
            (user.op == "call_module" and isinstance(gm.get_submodule(user.target), _CHILD_MODULES))
            or (user.op == "call_function" and user.target in _CHILD_FUNCTIONS)
            or (user.op == "call_method" and user.target in _CHILD_METHODS)
        ) and user.args[0] is node:
            node = user
        else:
            break
    return node


__all__ = ["SNACS", "edge_conditional_mutual_information", "edge_mutual_information"]


# --------------------------------------------------------------------------------------------------
# the EDGE estimator
# --------------------------------------------------------------------------------------------------


def _quantise(z: np.ndarray, eps: float, shift: np.ndarray) -> np.ndarray:
    """Integer bucket index per coordinate: floor((standardised value + shift) / eps)."""
    sd = z.std(0)
    z = (z - z.mean(0)) / np.where(sd > 0, sd, 1.0)
    return np.floor((z + shift) / eps).astype(np.int64)


def _codes(q: np.ndarray) -> np.ndarray:
    """Compact bucket ids of integer bucket vectors (mixed radix, then a fast 1-D unique)."""
    q = q - q.min(0)
    code = np.zeros(len(q), dtype=np.int64)
    for col in q.T:
        code = code * (int(col.max()) + 1) + col
    return np.unique(code, return_inverse=True)[1].ravel()


def _plugin_mi(cx: np.ndarray, cy: np.ndarray) -> float:
    """Plug-in MI of two bucket labelings, minus its Miller-Madow bias."""
    n = len(cx)
    joint = cx * (int(cy.max()) + 1) + cy
    uniq, first, nij = np.unique(joint, return_index=True, return_counts=True)
    ni, mj = np.bincount(cx), np.bincount(cy)
    plug_in = float(np.sum(nij / n * np.log(nij * n / (ni[cx[first]] * mj[cy[first]]))))
    return plug_in - (len(uniq) - len(ni) - len(mj) + 1) / (2 * n)


def _widths(n: int, dim: int, eps: float | None, n_ensemble: int) -> np.ndarray:
    if n < 10:
        raise ValueError(f"need at least 10 paired samples to estimate mutual information, got {n}")
    if n_ensemble < 1:
        raise ValueError(f"n_ensemble must be >= 1, got {n_ensemble}")
    base = eps if eps is not None else 2.0 * n ** (-1.0 / (2 + dim))
    if not base > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return base * np.geomspace(0.7, 1.4, n_ensemble)


def edge_mutual_information(
    x: Any, y: Any, *, eps: float | None = None, n_ensemble: int = 5, seed: int = 0
) -> float:
    r"""Hash-based (EDGE) estimate of the mutual information :math:`I(X; Y)` in nats.

    Both variables are standardised and hashed into buckets of width :math:`\epsilon` (with a
    random shift); with :math:`N_i, M_j, N_{ij}` the counts of the :math:`x`-, :math:`y`- and joint
    buckets (the edges of the dependence graph),

    .. math:: \hat I = \sum_{(i,j): N_{ij} > 0} \frac{N_{ij}}{N}
              \log\frac{N_{ij} N}{N_i M_j} - \frac{E - B_x - B_y + 1}{2N},

    (:math:`E, B_x, B_y` the numbers of occupied joint, :math:`x` and :math:`y` buckets: the
    Miller-Madow bias of the plug-in estimate), averaged over ``n_ensemble`` widths
    :math:`\epsilon \in [0.7, 1.4]\cdot\epsilon_0`, :math:`\epsilon_0 = 2 N^{-1/(2 + d_x + d_y)}`.

    Parameters
    ----------
    x, y
        ``[n]`` or ``[n, d]`` arrays (or tensors) of paired samples.
    eps
        Base bucket width in standard deviations (default :math:`\epsilon_0`).
    n_ensemble
        Number of bucket widths averaged.
    seed
        Seed of the random shifts.

    Example
    -------
    >>> import numpy as np
    >>> from bayesprune.baselines import edge_mutual_information
    >>> rng = np.random.default_rng(0)
    >>> z = rng.standard_normal((2000, 2))
    >>> x, y = z[:, 0], 0.9 * z[:, 0] + np.sqrt(1 - 0.81) * z[:, 1]
    >>> round(float(-0.5 * np.log(1 - 0.81)), 2), round(edge_mutual_information(x, y), 1)
    (0.83, 0.8)
    """
    x, y = paired((x, "x"), (y, "y"))
    rng = np.random.default_rng(seed)
    estimates = []
    for e in _widths(len(x), x.shape[1] + y.shape[1], eps, n_ensemble):
        cx = _codes(_quantise(x, e, rng.uniform(0, e, x.shape[1])))
        cy = _codes(_quantise(y, e, rng.uniform(0, e, y.shape[1])))
        estimates.append(_plugin_mi(cx, cy))
    return float(np.mean(estimates))


def edge_conditional_mutual_information(
    x: Any, y: Any, z: Any, *, eps: float | None = None, n_ensemble: int = 5, seed: int = 0
) -> float:
    r""":math:`I(X; Y \mid Z) = I(X; (Y, Z)) - I(X; Z)` (chain rule), both terms by EDGE.

    Both terms use the same bucket widths (set by :math:`d_x + d_y + d_z`) and the same random
    shifts, so the :math:`(Y, Z)` buckets refine the :math:`Z` buckets and the difference is
    the information :math:`Y` adds at that resolution.

    >>> import numpy as np
    >>> from bayesprune.baselines import edge_conditional_mutual_information
    >>> rng = np.random.default_rng(0)
    >>> y, z = rng.standard_normal((2, 2000))
    >>> edge_conditional_mutual_information(y + z, y, z) > edge_conditional_mutual_information(z, y, z)
    True
    """
    x, y, z = paired((x, "x"), (y, "y"), (z, "z"))
    rng = np.random.default_rng(seed)
    estimates = []
    for e in _widths(len(x), x.shape[1] + y.shape[1] + z.shape[1], eps, n_ensemble):
        cx = _codes(_quantise(x, e, rng.uniform(0, e, x.shape[1])))
        qy = _quantise(y, e, rng.uniform(0, e, y.shape[1]))
        qz = _quantise(z, e, rng.uniform(0, e, z.shape[1]))
        estimates.append(
            _plugin_mi(cx, _codes(np.concatenate([qy, qz], 1))) - _plugin_mi(cx, _codes(qz))
        )
    return float(np.mean(estimates))


# --------------------------------------------------------------------------------------------------
# SNACS
# --------------------------------------------------------------------------------------------------


class SNACS(PruningMethod):
    """Adaptive-connectivity-score pruning of hidden nodes / filters (see the module docstring).

    Parameters
    ----------
    groups
        Number of parent groups :math:`G` per layer (8).
    per_class
        Class-balanced examples per class for the MI estimates and the SVMs (200).
    protect_fraction
        Fraction of each layer's nodes protected by the sensitivity criterion (0.1).
    limit_grid
        Pruning fractions tried for the upper limits (0, 0.1, ..., 0.9).
    limit_tolerance
        The 0.7 of :math:`\\max - 0.7(\\max - \\min)`.
    n_ensemble, seed, progress
        EDGE ensemble size, seed of the hashing / sampling / SVM split, tqdm bar.
    """

    name = "SNACS"
    structured = True

    def __init__(
        self,
        *,
        groups: int = 8,
        per_class: int = 200,
        protect_fraction: float = 0.1,
        limit_grid: Iterable[float] = tuple(i / 10 for i in range(10)),
        limit_tolerance: float = 0.7,
        n_ensemble: int = 5,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive integer, got {groups}")
        if not isinstance(per_class, int) or per_class < 5:
            raise ValueError(f"per_class must be an integer >= 5, got {per_class}")
        if not 0.0 <= protect_fraction < 1.0:
            raise ValueError(f"protect_fraction must be in [0, 1), got {protect_fraction}")
        self.limit_grid = sorted(float(p) for p in limit_grid)
        if not self.limit_grid or not all(0.0 <= p < 1.0 for p in self.limit_grid):
            raise ValueError(f"limit_grid must be fractions in [0, 1), got {list(limit_grid)}")
        self.groups, self.per_class = groups, per_class
        self.protect_fraction = float(protect_fraction)
        if not 0 <= limit_tolerance <= 1:
            raise ValueError(
                "limit_tolerance is the share of the SVM accuracy range a pruned layer may lose, "
                f"in [0, 1]; got {limit_tolerance}"
            )
        self.limit_tolerance = float(limit_tolerance)
        self.n_ensemble, self.seed, self.progress = n_ensemble, seed, progress
        self.upper_limits: dict[str, float] = {}
        self.protected: dict[str, torch.Tensor] = {}
        self.svm_accuracy: dict[str, list[float]] = {}

    # -- activations -----------------------------------------------------------------------------
    @torch.no_grad()
    def _io(self, gm: fx.GraphModule, x: torch.Tensor, consumer: str):
        """Input of ``consumer`` (the parents' activations) and the child activations: its output
        after the BatchNorm and activation that follow it alone, as the network passes it on."""
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == consumer)
        targets = (node.args[0], _child_node(gm, node))
        # a copy of the graph that returns the two values and stops there
        graph, env = fx.Graph(), {}
        for n in gm.graph.nodes:
            env[n] = graph.node_copy(n, lambda a: env[a])
            if all(t in env for t in targets):
                break
        graph.output(tuple(env[t] for t in targets))
        return fx.GraphModule(gm, graph)(x)

    def _contributions(self, cons: nn.Module, a: torch.Tensor, group_of: torch.Tensor, repeat: int):
        """[G, n, C_out]: what each parent group sends to each child (spatially averaged)."""
        out = []
        for g in range(self.groups):
            sel = (
                (group_of == g).repeat_interleave(repeat)
                if isinstance(cons, nn.Linear)
                else group_of == g
            )
            if not sel.any():
                out.append(None)
                continue
            if isinstance(cons, nn.Linear):
                out.append(a[:, sel] @ cons.weight[:, sel].T)
            else:
                masked = a * sel.view(1, -1, *([1] * (a.dim() - 2))).to(a.dtype)
                fn = F.conv2d if a.dim() == 4 else F.conv1d
                y = fn(
                    masked, cons.weight, None, cons.stride, cons.padding, cons.dilation, cons.groups
                )
                out.append(spatial_mean(y))
        return out

    @torch.no_grad()
    def _fit(self, net: nn.Module, train_loader: Iterable | None, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"SNACS.fit got unexpected arguments {sorted(kwargs)}")
        if train_loader is None:
            raise ValueError("SNACS estimates mutual information from data: pass a train_loader")
        example = self._device_input()
        dev = example.device
        layers = hidden_layers(net, example)
        # activations are those of the deployed (eval-mode) graph: training-only noise such as
        # F.dropout(training=self.training) or stochastic depth is baked in off; consumers that
        # only training mode runs (auxiliary heads) do not score a parent
        gm = trace(net, None, training=False)
        called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        groups = {
            g.producers[0]: g for g in dependency_groups(net, example) if len(g.producers) == 1
        }
        consumers = {n: [c for c in groups[n].consumers if c[0] in called] for n in layers}
        usable = [n for n in layers if consumers[n]]
        if not usable:
            raise ValueError("the network has no hidden Linear / Conv layer feeding another layer")
        x, y = balanced(train_loader, self.per_class, self.seed)
        if len(torch.unique(y)) < 2:
            raise ValueError("SNACS needs labelled data of at least two classes")
        x = x.to(dev)
        yn = y.numpy()
        rng = np.random.default_rng(self.seed)
        split = rng.permutation(len(yn)) < len(yn) // 2
        bar = tqdm(total=len(usable), disable=not self.progress, desc="SNACS", leave=False)
        for name in usable:
            layer = net.get_submodule(name)
            width = layer.weight.shape[0]
            group_of = torch.arange(width) * self.groups // width
            scores = torch.zeros(width, dtype=torch.float64)
            contribution = torch.zeros(width, dtype=torch.float64)
            parent_act = None
            for consumer, repeat in consumers[name]:
                cons = net.get_submodule(consumer)
                a, out = self._io(gm, x, consumer)
                a = a.flatten(1) if isinstance(cons, nn.Linear) else a
                child = spatial_mean(out).cpu().numpy()
                if parent_act is None:
                    pa = (
                        a.view(len(a), width, -1).mean(2)
                        if isinstance(cons, nn.Linear)
                        else spatial_mean(a)
                    )
                    parent_act = pa.cpu().numpy()
                contrib = self._contributions(cons, a, group_of.to(dev), repeat)
                total = sum(c for c in contrib if c is not None)
                # mean |weight| from parent i to child j, min-max normalised over the layer pair
                w = cons.weight.detach().abs()
                w = w.view(w.shape[0], width, -1).mean(2).T.double().cpu()  # [parents, children]
                w = (w - w.min()) / (w.max() - w.min()).clamp_min(1e-12)
                cmi = torch.zeros(self.groups, w.shape[1], dtype=torch.float64)
                for g, c in enumerate(contrib):
                    if c is None:
                        continue
                    rest = (total - c).cpu().numpy()
                    cg = c.cpu().numpy()
                    for j in range(w.shape[1]):
                        cmi[g, j] = edge_conditional_mutual_information(
                            child[:, j], cg[:, j], rest[:, j], n_ensemble=self.n_ensemble,
                            seed=self.seed + j,
                        )  # fmt: skip
                scores += (cmi[group_of] * w).sum(1)
                contribution += (
                    cons.weight.detach()
                    .abs()
                    .view(cons.weight.shape[0], width, -1)
                    .sum((0, 2))
                    .double()
                    .cpu()
                )
            self.scores[name] = scores.float()
            n_protect = math.floor(self.protect_fraction * width)
            prot = torch.zeros(width, dtype=torch.bool)
            prot[torch.argsort(-contribution / contribution.max().clamp_min(1e-12))[:n_protect]] = (
                True
            )
            self.protected[name] = prot
            self.upper_limits[name] = self._upper_limit(name, parent_act, yn, split)
            bar.update()
        bar.close()

    def _upper_limit(self, name: str, act: np.ndarray, y: np.ndarray, split: np.ndarray) -> float:
        from sklearn.svm import LinearSVC

        order = torch.argsort(self.scores[name], stable=True).numpy()
        width = len(order)
        mu, sd = act[split].mean(0), act[split].std(0) + 1e-8
        z = (act - mu) / sd
        accs = []
        for p in self.limit_grid:
            keep = np.sort(order[math.floor(p * width) :])
            svm = LinearSVC(C=1.0, max_iter=2000, random_state=self.seed)
            svm.fit(z[split][:, keep], y[split])
            accs.append(float((svm.predict(z[~split][:, keep]) == y[~split]).mean()))
        self.svm_accuracy[name] = accs
        hi, lo = max(accs), min(accs)
        ok = [
            p
            for p, a in zip(self.limit_grid, accs, strict=True)
            if a >= hi - self.limit_tolerance * (hi - lo)
        ]
        return max(ok)

    def snacs_level(self) -> float:
        """The level at which :meth:`prune` gives SNACS's single-shot decision (the largest limit)."""
        self._require_fit()
        return max(self.upper_limits.values())

    def _masks(self, level: float) -> dict[str, torch.Tensor]:
        out = {}
        for name, s in self.scores.items():
            width = s.numel()
            n_drop = min(
                math.floor(level * width + 1e-9),
                math.floor(self.upper_limits[name] * width + 1e-9),
                width - max(1, int(self.protected[name].sum())),
            )
            order = [
                i for i in torch.argsort(s, stable=True).tolist() if not self.protected[name][i]
            ]
            keep = torch.ones(width, dtype=torch.bool)
            keep[order[:n_drop]] = False
            out[name] = keep
        return out
