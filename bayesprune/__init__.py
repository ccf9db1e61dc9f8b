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

from . import data, files, metrics
from .metrics import count_flops, count_nonzero, count_params, measure_latency
from .train import evaluate, train

# -- core (issue 3) --
# isort: split
from . import distributed, priors
from .bayesianize import BayesianModule, bayesianize, load
from .inference import FitResult, fit
from .priors import register_prior
from .registry import LayerSpec, register_layer

# -- pruning (issue 4) --
# isort: split
from .batchnorm import fold_batchnorm, recalibrate_batchnorm
from .elimination import elimination_scores
from .pruning import (
    CompressionReport,
    PrunedMultiheadAttention,
    compression_report,
    dependency_groups,
    finetune,
    load_pruned,
    plan_pruning,
    prune,
    prune_module,
    save_pruned,
    zero_masked,
)

# -- conformal (issue 5) --
# isort: split
from . import certificate, conformal

# -- baselines (issue 6) --
# isort: split
from . import baselines

# -- user path (issue 7) --
# isort: split
from . import plots
from .interop import to_arviz

__version__ = "0.1.0"

__all__ = [
    "BayesianModule",
    "CompressionReport",
    "FitResult",
    "LayerSpec",
    "PrunedMultiheadAttention",
    "baselines",
    "bayesianize",
    "certificate",
    "compression_report",
    "conformal",
    "count_flops",
    "count_nonzero",
    "count_params",
    "data",
    "dependency_groups",
    "distributed",
    "elimination_scores",
    "evaluate",
    "files",
    "finetune",
    "fit",
    "fold_batchnorm",
    "load",
    "load_pruned",
    "measure_latency",
    "metrics",
    "plan_pruning",
    "plots",
    "priors",
    "prune",
    "prune_module",
    "recalibrate_batchnorm",
    "register_layer",
    "register_prior",
    "save_pruned",
    "to_arviz",
    "train",
    "zero_masked",
]
