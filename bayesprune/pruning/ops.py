"""What the pruner knows about operations: which keep a zero channel zero, which regroup or reduce
axes, which add or multiply (the rules of :mod:`bayesprune.pruning.graph`)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ADDITIVE",
    "ADDITIVE_METHODS",
    "MULTIPLICATIVE",
    "MULTIPLICATIVE_METHODS",
    "OFFSET_MODULES",
    "REDUCE_FUNCTIONS",
    "REDUCTIONS",
    "RESHAPES_FUNCTIONS",
    "RESHAPES_METHODS",
    "ZERO_PRESERVING_FUNCTIONS",
    "ZERO_PRESERVING_METHODS",
    "ZERO_PRESERVING_MODULES",
]

# Parameter-free modules that act per channel and map 0 to 0 (eval mode), so a zero channel stays
# zero through them and can be removed on both sides.
ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)  # fmt: skip


# Per-channel modules that map 0 to a non-zero value: the channel axis passes through, but its
# channels cannot be removed.
OFFSET_MODULES = (nn.Sigmoid, nn.Softplus, nn.Hardsigmoid, nn.LogSigmoid)


ZERO_PRESERVING_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.hardtanh, F.hardswish, torch.tanh, F.tanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
}  # fmt: skip


ZERO_PRESERVING_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "detach", "float", "to",
}  # fmt: skip


# Operations that only regroup the axes after the channel axis (checked on the traced shapes).
RESHAPES_FUNCTIONS = {torch.flatten, torch.reshape}


RESHAPES_METHODS = {"flatten", "view", "reshape"}


# Reductions map an all-zero slice to 0; they are followed only when they spare axes 0 and 1.
REDUCTIONS = {"mean", "sum", "amax", "amin"}


REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}


ADDITIVE = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}


MULTIPLICATIVE = {operator.mul, operator.imul, torch.mul}


ADDITIVE_METHODS = {"add", "add_", "sub", "sub_"}


MULTIPLICATIVE_METHODS = {"mul", "mul_"}
