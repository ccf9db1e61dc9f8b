"""The file format of a saved :class:`~bayesprune.BayesianModule`: what ``bnet.save`` writes and
:func:`bayesprune.load` reads.

A saved module is one ``.safetensors`` file (no pickle):

* the tensors of ``bnet.state_dict()`` (the variational parameters, BatchNorm statistics, ...),
  under their own names;
* the weights of the dense network given to :func:`bayesprune.bayesianize`
  (:meth:`~bayesprune.BayesianModule.dense_module`), under names starting with
  :data:`DENSE_KEY`;
* in the header's metadata, under ``"bayesprune"``, the JSON of
  :meth:`~bayesprune.BayesianModule.config` (format :data:`FORMAT`, priors, likelihood, ...),
  which :func:`bayesprune.load` needs, besides a plain network of the same architecture, to
  rebuild the module.

:func:`write_module` writes such a file (atomically, :mod:`bayesprune.files`);
:func:`read_config` checks a file and reads its config; :func:`restore_state` puts the file's
tensors into a module rebuilt from that config. :func:`bayesprune.load` is the three steps
together, with :func:`bayesprune.bayesianize` in the middle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._utils import with_versions
from .files import atomic_write, check_target

if TYPE_CHECKING:
    from .module import BayesianModule

__all__ = ["DENSE_KEY", "FORMAT", "mismatch", "read_config", "restore_state", "write_module"]

#: the ``"format"`` entry of a saved module's config, checked on reading
FORMAT = "bayesprune.BayesianModule/1"
#: key prefix of the dense network's weights in a saved BayesianModule
DENSE_KEY = "dense_reference/"


def mismatch(path: str | Path) -> str:
    """The start of the message of a network that does not fit the file ``path``."""
    return f"the network passed to load does not match the architecture saved in {path}"


def write_module(bnet: BayesianModule, path: str | Path) -> None:
    """Write ``bnet`` to the ``.safetensors`` file ``path`` (what ``bnet.save(path)`` does)."""
    from safetensors.torch import save_file

    check_target(path)
    state = {k: v.detach().cpu().clone() for k, v in bnet.state_dict().items()}
    if bnet.has_dense_reference:
        dense = bnet._template[0].state_dict()
        state.update({DENSE_KEY + k: v.detach().cpu().clone() for k, v in dense.items()})
    meta = {"bayesprune": json.dumps(bnet.config())}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_config(path: Path) -> dict[str, Any]:
    """The config saved in the module file ``path``; a ``FileNotFoundError`` or a ``ValueError``
    when ``path`` is not a readable module file of this format."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no saved BayesianModule at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc
    if "bayesprune" not in meta:
        raise ValueError(
            f"{path} is not a bayesprune BayesianModule file (no 'bayesprune' metadata)"
        )
    cfg = json.loads(meta["bayesprune"])
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path} has format {cfg.get('format')!r}; this version reads {FORMAT!r}")
    return cfg


def restore_state(bnet: BayesianModule, path: Path, cfg: dict[str, Any]) -> None:
    """Load the tensors of the module file ``path`` (config ``cfg``) into ``bnet``, a module
    rebuilt from ``cfg``: its parameters and buffers, the dense network's weights, ``num_data``
    and ``input_shape``."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    dense_state = {k[len(DENSE_KEY) :]: v for k, v in state.items() if k.startswith(DENSE_KEY)}
    state = {k: v for k, v in state.items() if not k.startswith(DENSE_KEY)}
    missing = [k for k in bnet.state_dict() if k not in state]
    if missing and all(k.endswith(".hs_reference") for k in missing):
        raise ValueError(
            f"{path} was saved by a bayesprune version whose group-horseshoe layers had no "
            "'hs_reference' (the initial node scale that their inclusion probabilities are "
            "measured against) and it cannot be recovered from the file: fit the network again"
        )
    try:
        bnet.load_state_dict(with_versions(state, bnet))
    except RuntimeError as exc:
        detail = "; ".join(
            line.strip() for line in str(exc).splitlines()[1:4] if line.strip()
        )  # the first differences, on one line
        raise ValueError(f"{mismatch(path)}: {detail}") from None
    if cfg.get("dense_reference") and dense_state:
        template = bnet._template[0]
        try:
            template.load_state_dict(with_versions(dense_state, template))
        except RuntimeError as exc:
            raise ValueError(
                f"the dense weights saved in {path} do not fit the network passed to load: {exc}"
            ) from None
    else:  # saved before the dense weights were stored: the template holds net's weights
        bnet.has_dense_reference = False
    # (the property binds the priors: a file whose priors lack N gets it here)
    bnet.num_data = cfg["num_data"]
    shape = cfg.get("input_shape")  # files saved before it was recorded have none
    bnet.input_shape = None if shape is None else tuple(shape)
