"""bayesprune: Bayesian neural-network pruning with probabilistic programming.

The path of a network through the package::

    nn.Module --bayesianize--> BayesianModule --fit (SVI)--> posterior (PIPs) --prune--> smaller nn.Module
                                                                              --certify (LTT)--> certificate

Example
-------
>>> import bayesprune as bp
>>> "bayesianize" in bp.__all__
True
"""

from __future__ import annotations

from . import data, metrics
from .metrics import count_flops, count_nonzero, count_params, measure_latency
from .train import evaluate, train

# -- core (issue 3) --
# -- pruning (issue 4) --
# -- conformal (issue 5) --
# -- baselines (issue 6) --
# -- user path (issue 7) --

__version__ = "0.1.0"

__all__ = [
    "count_flops",
    "count_nonzero",
    "count_params",
    "data",
    "evaluate",
    "measure_latency",
    "metrics",
    "train",
]
