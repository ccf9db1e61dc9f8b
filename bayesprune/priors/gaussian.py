r"""The mean-field Gaussian prior: weight noise without node selection.

Example
-------
>>> from bayesprune.priors import Gaussian
>>> Gaussian(scale=0.5).to_dict()
{'type': 'Gaussian', 'scale': 0.5}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._checks import check_positive
from ._weights import guide_weight_sites, node_kl, weight_sites
from .base import Prior, register_prior

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..layers import BayesianLayer

__all__ = ["Gaussian"]


@register_prior
@dataclass(frozen=True, kw_only=True)
class Gaussian(Prior):
    r"""Mean-field Gaussian prior :math:`w_i \sim \mathcal N(0, s^2)`, :math:`q(w_i) = \mathcal N(\mu_i, \sigma_i^2)`.

    .. math:: \mathrm{KL} = \sum_i \log\frac{s}{\sigma_i} + \frac{\sigma_i^2 + \mu_i^2}{2 s^2} - \frac12 .

    It has no node inclusion variable, so :meth:`bayesprune.BayesianModule.inclusion_probs` returns an
    empty dict for layers under this prior, and no structure parameters. The per-weight
    signal-to-noise ratio :math:`|\mu_i| / \sigma_i` is available as
    ``layer.weight_loc.abs() / layer.weight_scale``.

    Parameters
    ----------
    scale
        Prior standard deviation :math:`s` of every weight and bias.

    >>> from bayesprune.priors import Gaussian
    >>> Gaussian(scale=0.5).scale
    0.5
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        check_positive("Gaussian", "scale", self.scale)

    def base_scale(self, layer: BayesianLayer) -> float:
        return self.scale

    def kl(self, layer: BayesianLayer) -> torch.Tensor:
        return node_kl(layer, self.scale).sum()

    def model_sites(self, layer, path):
        w, b = weight_sites(layer, path, self.scale)
        return w, b, None

    def guide_sites(self, layer, path):
        w, b = guide_weight_sites(layer, path)
        return w, b, None
