"""Gemma Scope's parameter files: Gemma Scope (Gemma 2; ``params.npz``) and Gemma Scope 2 (Gemma 3;
``params.safetensors``), as published in their Hugging Face repositories.

A folder holds ``w_enc`` [d_in, d_sae], ``w_dec`` [d_sae, d_out], ``b_enc``, ``b_dec``, ``threshold`` (a JumpReLU
SAE, ``apply_b_dec_to_input`` false), and for Gemma Scope 2's affine transcoders ``affine_skip_connection``
[d_in, d_out] (our ``W_skip`` is its transpose). The files do not name their hook: like SAELens's loaders, the
hook comes from the folder path (``layer_12/width_16k/...`` under ``resid_post``, ``attn_out``, ``mlp_out`` or
``transcoder``), or from ``hook_name=``. Gemma Scope 2's attention SAEs read ``hook_z`` (heads flattened).
"""

from __future__ import annotations

import os
import re

import mlx.core as mx
import numpy as np

from ..readers import load_safetensors
from .config import SAEConfig
from .files import build_sae
from .sae import SAE

GEMMA_SCOPE_FILES = ("params.npz", "params.safetensors")


def is_gemma_scope(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in GEMMA_SCOPE_FILES)


def gemma_scope_hooks(path: str) -> tuple[str, str]:
    """(hook_name, hook_name_out) from a Gemma Scope folder path ("" for an SAE's output hook)."""
    p = os.path.abspath(path).replace(os.sep, "/").lower()
    m = re.search(r"layer_(\d+)", p)
    if m is None:
        raise ValueError(f"{path}: no 'layer_N' in the path, so the hook is unknown; pass hook_name=... (e.g. "
                         f"'blocks.12.hook_resid_post').")
    layer = int(m.group(1))
    if "transcoder" in p or "clt" in p:  # Gemma Scope's read the MLP's normalised input, Gemma Scope 2's hook_mlp_in
        src = "ln2.hook_normalized" if os.path.isfile(os.path.join(path, "params.npz")) else "hook_mlp_in"
        return f"blocks.{layer}.{src}", f"blocks.{layer}.hook_mlp_out"
    # Gemma Scope 2 folders name the site; Gemma Scope's repositories end in -res / -att / -mlp
    for key, hook in (("resid_post", "hook_resid_post"), ("attn_out", "attn.hook_z"), ("mlp_out", "hook_mlp_out"),
                      ("-res/", "hook_resid_post"), ("-att/", "attn.hook_z"), ("-mlp/", "hook_mlp_out")):
        if key in p + "/":
            return f"blocks.{layer}.{hook}", ""
    raise ValueError(f"{path}: the path names no site (resid_post, attn_out, mlp_out, transcoder); pass hook_name=...")


def load_gemma_scope(path: str, hook_name: str | None = None, hook_name_out: str | None = None) -> SAE:
    """A Gemma Scope / Gemma Scope 2 folder as a JumpReLU SAE (or transcoder). ``hook_name`` /
    ``hook_name_out`` override what the folder path says."""
    name = next((f for f in GEMMA_SCOPE_FILES if os.path.isfile(os.path.join(path, f))), None)
    if name is None:
        raise FileNotFoundError(f"{path} has no Gemma Scope parameters ({' or '.join(GEMMA_SCOPE_FILES)}).")
    file = os.path.join(path, name)
    if name.endswith(".npz"):
        with np.load(file) as z:
            raw = {k.lower(): mx.array(z[k].astype(np.float32)) for k in z.files}
    else:
        raw = {k.lower(): v.astype(mx.float32) for k, v in load_safetensors(file).items()}
    need = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
    missing = [k for k in need if k not in raw]
    if missing:
        raise ValueError(f"{file}: missing {missing}; a Gemma Scope file holds {', '.join(need)}.")
    if hook_name is None:
        hook_name, inferred_out = gemma_scope_hooks(path)
        hook_name_out = inferred_out if hook_name_out is None else hook_name_out
    d_in, d_sae = raw["w_enc"].shape
    d_out = raw["w_dec"].shape[1]
    skip = "affine_skip_connection" in raw
    transcoder = bool(hook_name_out) or skip or d_out != d_in
    if transcoder and not hook_name_out:
        raise ValueError(f"{path}: a transcoder (d_out {d_out}{', affine skip' if skip else ''}); pass hook_name_out=.")
    scale = raw.pop("scaling_factor", None)
    if scale is not None and not bool(mx.all(scale == 1.0).item()):
        raise ValueError(f"{file}: a fine-tuning scaling_factor that is not 1 is not supported.")
    cfg = SAEConfig(architecture="jumprelu", d_in=d_in, d_sae=d_sae, hook_name=hook_name, apply_b_dec_to_input=False,
                    d_out=d_out if transcoder else 0, hook_name_out=hook_name_out or "", skip_connection=skip,
                    decoder_unit_norm=False, normalize_activations="none",
                    extra={"imported_from": "gemma_scope", "path": os.path.abspath(path)})
    tensors = {"W_enc": raw["w_enc"], "W_dec": raw["w_dec"], "b_enc": raw["b_enc"], "b_dec": raw["b_dec"],
               "threshold": raw["threshold"]}
    if skip:
        tensors["W_skip"] = raw["affine_skip_connection"].T
    return build_sae(cfg, tensors, path)
