"""SAE kernels: ``reference`` (pure MLX, every back end) is the definition fused back ends must match.

A fused back end plugs in by providing the same functions (``topk_encode``, ``topk_decode`` ...) wrapped
in ``mx.custom_function`` with a ``.vjp``, and registering itself in ``BACKENDS``; ``get_backend(name)``
returns the module the trainer calls.
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
