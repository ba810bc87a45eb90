"""SAE kernels. Nothing here knows about SAE configs, SAE objects or metrics; imports point one way:
``fused`` -> ``select`` -> (``cpu`` | ``cuda`` | ``metal``) -> ``ops``.

* ``ops.py``: the ``Ops`` interface (``ReferenceOps``, its pure-MLX implementation), arrays in, arrays out.
* ``cpu.py``, ``cuda.py``, ``metal.py``: its back ends; ``select.py``: which one runs (self-checked at first
  use against ``ReferenceOps``, with a warning and the reference as fallback).
* ``fused.py``: what is built from the ops: the TopK custom-VJP forward with a sparse backward, the BatchTopK
  cut, the fused Adam passes, and per-op functions with the same names as ``reference.py``.
* ``reference.py``: the definition (pure MLX, MLX's autodiff) that everything is tested against.
* ``step.py``: ``FusedTopKStep``, the bare fused TopK step.

``get_backend(name)`` returns the module ("reference" or "fused") that ``sae.step_kernels.StepKernels``
composes for a trainer.
"""

from __future__ import annotations

from . import reference

BACKENDS = {"reference": reference}

# Fused CUDA / Metal kernels behind the same per-op functions, self-checked at first use with a pure-MLX
# fallback (issue 7). ``fused.topk_sae_forward`` / ``fused.fused_adam_renorm`` are the fully fused path.
from . import fused  # noqa: E402

BACKENDS["fused"] = fused


def resolve_kernels(name: str) -> str:
    """The back-end module name for a ``kernels`` setting: "auto" and "fused" -> "fused" (whose ops are the
    best self-checked ones of the device: CUDA, Metal, or the sparse CPU ops), "reference" -> "reference"."""
    if name in ("auto", "fused"):
        return "fused"
    if name == "reference":
        return "reference"
    raise ValueError(f"kernels = {name!r} is not a back end; expected 'auto' (the default), 'fused' or 'reference'.")


def get_backend(name: str = "reference"):
    if name == "fused" and "fused" not in BACKENDS:
        from . import fused  # imported on demand: GPU back ends compile on first use

        BACKENDS["fused"] = fused
    if name not in BACKENDS:
        raise ValueError(f"Unknown SAE kernel back end {name!r}; available: {sorted(BACKENDS)}.")
    return BACKENDS[name]
