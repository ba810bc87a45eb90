"""SAE files: native (safetensors + JSON config), SAELens (v6) and sparsify formats.

Native folder: ``cfg.json`` (``SAEConfig`` fields plus ``"format": "hooked_mlx.sae"``) and ``sae.safetensors``
(``W_enc`` [d_in,d_sae], ``b_enc``, ``W_dec`` [d_sae,d_in], ``b_dec``, and ``threshold`` for JumpReLU /
BatchTopK). The weights take raw activations (normalisation folded).

SAELens folder (``SAE.load_from_disk``): ``cfg.json`` + ``sae_weights.safetensors``. Architectures map
relu -> ``standard``, topk -> ``topk`` (``rescale_acts_by_decoder_norm`` false), jumprelu -> ``jumprelu``, and
batchtopk -> ``jumprelu`` with ``threshold = theta * ones(d_sae)``. ``metadata.hook_name`` is the canonical hook
name; ``normalize_activations`` is ``none`` (folded).

sparsify folder (one per hookpoint): ``cfg.json`` + ``sae.safetensors`` with ``encoder.weight`` [F,D] (PyTorch
Linear orientation), ``encoder.bias`` [F], ``W_dec`` [F,D], ``b_dec`` [D]; TopK only. sparsify names
hookpoints by module path (``layers.3``); ``SPARSIFY_HOOKPOINTS`` maps them to canonical hook names.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import mlx.core as mx

from ..outputs import staged_dir
from ..readers import load_safetensors, read_json
from .architectures import ARCHS
from .config import FORMAT_VERSION, RUN_TIME_NORMS, SAEConfig
from .sae import SAE

NATIVE_CONFIG = "cfg.json"
NATIVE_WEIGHTS = "sae.safetensors"
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
NATIVE_FORMAT = "hooked_mlx.sae"
SAELENS_VERSION = "6.18.0"  # the SAELens format version written (>= 6.0.0 keeps the metadata block)

#: sparsify hookpoint (HF module path) -> canonical hook name; {l} is the layer
SPARSIFY_HOOKPOINTS = {
    r"^(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)$": "blocks.{l}.hook_resid_post",
    r"^(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)\.(?:mlp)$": "blocks.{l}.hook_mlp_out",
    r"^(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)\.(?:self_attn|attn|attention)$": "blocks.{l}.hook_attn_out",
    r"^(?:model\.)?embed_tokens$": "hook_embed",
}


def _atomic_write_dir(path: str, files: dict[str, Any], *, overwrite: bool, what: str) -> None:
    """Write {name: (arrays, metadata) (safetensors) | dict (json)} as folder ``path``, staged and renamed
    (``hooked_mlx.outputs``: a non-empty folder is refused unless ``overwrite``, which replaces only these
    files)."""
    with staged_dir(path, overwrite=overwrite, what=what) as tmp:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                arrays, meta = content
                mx.save_safetensors(str(tmp / name), arrays, metadata=meta)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2))


def _weights(sae: SAE) -> dict[str, mx.array]:
    w = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    for name in ("threshold", "W_skip", "b_gate", "r_mag"):
        if name in sae:
            w[name] = getattr(sae, name)
    return {k: v.astype(mx.float32) for k, v in w.items()}


def _load_tensors(path: str) -> dict[str, mx.array]:
    return load_safetensors(path)


def build_sae(cfg: SAEConfig, tensors: dict[str, mx.array], source: str) -> SAE:
    """An ``SAE`` of ``cfg`` holding ``tensors`` (float32), each checked against the shape ``cfg`` gives it;
    ``source`` names where they came from in the errors."""
    sae = SAE(cfg)
    D, F, Do = cfg.d_in, cfg.resolved_d_sae, cfg.resolved_d_out
    expected = {"W_enc": (D, F), "b_enc": (F,), "W_dec": (F, Do), "b_dec": (Do,)}
    for name in ("threshold", "b_gate", "r_mag"):
        if name in sae:
            expected[name] = (F,)
    if cfg.skip_connection:
        expected["W_skip"] = (Do, D)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{source}: missing tensors {missing}; found {sorted(tensors)}.")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise ValueError(f"{source}: tensor {k} has shape {tuple(tensors[k].shape)}, expected {shape} "
                             f"(d_in {D}, d_sae {F}{f', d_out {Do}' if Do != D else ''}).")
    sae.update({k: tensors[k].astype(mx.float32) for k in expected})
    mx.eval(sae.parameters())
    return sae


# ---------------------------------------------------------------------------------------------------
# native
# ---------------------------------------------------------------------------------------------------


def save_sae(sae: SAE, path: str, *, overwrite: bool = False) -> str:
    """Save to folder ``path`` (cfg.json + sae.safetensors); returns the folder.

    ``path`` must be new or empty; ``overwrite=True`` replaces cfg.json and sae.safetensors in an existing
    folder and leaves everything else there."""
    cfg = sae.cfg.to_dict()
    cfg["format"] = NATIVE_FORMAT
    cfg["format_version"] = FORMAT_VERSION
    _atomic_write_dir(path, {NATIVE_WEIGHTS: (_weights(sae), {"format": NATIVE_FORMAT}), NATIVE_CONFIG: cfg},
                      overwrite=overwrite, what="save_sae")
    return path


def load_sae(path: str) -> SAE:
    """Load a native folder; SAELens and sparsify folders are detected and loaded too."""
    kind = detect_format(path)
    if kind == "saelens":
        return load_saelens(path)
    if kind == "sparsify":
        return load_sparsify(path)
    if kind == "gemma_scope":
        from .gemma_scope import load_gemma_scope  # (it builds on this module)

        return load_gemma_scope(path)
    d = read_json(os.path.join(path, NATIVE_CONFIG), "SAE config")
    d.pop("format", None)
    version = d.pop("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer hooked_mlx (format {version}); upgrade hooked_mlx.")
    return build_sae(SAEConfig.from_dict(d), _load_tensors(os.path.join(path, NATIVE_WEIGHTS)), path)


def detect_format(path: str) -> str:
    """'native', 'saelens', 'sparsify' (also a multi-hookpoint root) or 'gemma_scope' for a folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder of SAE files.")
    files = set(os.listdir(path))
    if SAELENS_WEIGHTS in files:
        return "saelens"
    if NATIVE_WEIGHTS in files and NATIVE_CONFIG in files:
        d = read_json(os.path.join(path, NATIVE_CONFIG), "SAE config")
        return "native" if d.get("format") == NATIVE_FORMAT else "sparsify"
    subs = [f for f in files if os.path.isfile(os.path.join(path, f, SPARSIFY_WEIGHTS))]
    if subs:
        return "sparsify"
    if "params.npz" in files or "params.safetensors" in files:
        return "gemma_scope"
    raise ValueError(
        f"{path} holds no SAE files: expected {NATIVE_CONFIG} + {NATIVE_WEIGHTS} (hooked_mlx), {SAELENS_CONFIG} + "
        f"{SAELENS_WEIGHTS} (SAELens), per-hookpoint folders with {SPARSIFY_WEIGHTS} (sparsify) or params.npz / "
        f"params.safetensors (Gemma Scope)."
    )


# ---------------------------------------------------------------------------------------------------
# SAELens
# ---------------------------------------------------------------------------------------------------


def export_saelens(sae: SAE, path: str, *, model_name: str | None = None, context_size: int | None = None,
                   dataset_path: str = "", prepend_bos: bool | None = None, overwrite: bool = False) -> str:
    """Write a SAELens v6 folder loadable by ``SAE.load_from_disk(path)`` (new or empty unless ``overwrite``)."""
    cfg = sae.cfg
    arch = cfg.arch
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    extra: dict = {}
    sl_arch = arch.saelens  # (batchtopk: a jumprelu with one threshold)
    if arch.gated:  # SAELens names the magnitude bias b_mag and has no b_enc
        tensors = {"W_enc": sae.W_enc, "b_gate": sae.b_gate, "r_mag": sae.r_mag, "b_mag": sae.b_enc,
                   "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    elif arch.inference == "topk":
        extra = {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    if arch.threshold is not None:
        tensors["threshold"] = sae.threshold
    if cfg.is_transcoder:
        if arch.saelens_transcoder is None:
            kinds = [a.name for a in ARCHS.values() if a.saelens_transcoder is not None]
            raise ValueError(f"SAELens has no {arch.name} transcoder (it has transcoder, skip_transcoder, "
                             f"jumprelu_transcoder, jumprelu_skip_transcoder); export a {' or '.join(kinds)} one.")
        sl_arch = arch.saelens_transcoder + ("skip_transcoder" if cfg.skip_connection else "transcoder")
        extra["d_out"] = sae.d_out
        if cfg.skip_connection:
            tensors["W_skip"] = sae.W_skip
    out_cfg = {
        "architecture": sl_arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations if cfg.normalize_activations in RUN_TIME_NORMS else "none",
        "reshape_activations": "hook_z" if cfg.hook_name.endswith(".hook_z") else "none",
        **extra,
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION,
            "model_name": model_name if model_name is not None else cfg.model_name,
            "model_class_name": "HookedTransformer",
            "hook_name": cfg.hook_name,
            "hook_head_index": None,
            "context_size": context_size if context_size is not None else cfg.context_size,
            "prepend_bos": cfg.prepend_bos if prepend_bos is None else prepend_bos,
            "seqpos_slice": [None],
            "dataset_path": dataset_path,
            "model_from_pretrained_kwargs": {},
            "exclude_special_tokens": cfg.exclude_special_tokens,
            "sequence_separator_token": "bos",
            "disable_concat_sequences": not cfg.packing,
            "exported_by": "hooked_mlx",
            "hooked_mlx_architecture": arch.name,
            "hooked_mlx_k": cfg.k if arch.uses_k else None,
            "hooked_mlx_hook_name_out": cfg.hook_name_out or None,
        },
    }
    _atomic_write_dir(path, {SAELENS_WEIGHTS: ({k: v.astype(mx.float32) for k, v in tensors.items()}, None),
                             SAELENS_CONFIG: out_cfg}, overwrite=overwrite, what="export_saelens")
    return path


#: SAELens architecture -> (ours, transcoder, skip connection)
SAELENS_ARCHITECTURES = {
    "standard": ("relu", False, False), "topk": ("topk", False, False), "jumprelu": ("jumprelu", False, False),
    "transcoder": ("relu", True, False), "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False), "jumprelu_skip_transcoder": ("jumprelu", True, True),
    "gated": ("gated", False, False),
}


def transcoder_output_hook(hook_name: str) -> str:
    """Where a transcoder reading ``hook_name`` writes: an MLP's input (``blocks.L.ln2.hook_normalized``,
    ``blocks.L.hook_mlp_in`` or ``blocks.L.hook_resid_mid``) predicts that block's ``hook_mlp_out``; "" if
    the input hook says nothing."""
    m = re.fullmatch(r"blocks\.(\d+)\.(ln2\.hook_normalized|hook_mlp_in|hook_resid_mid)", hook_name)
    return f"blocks.{m.group(1)}.hook_mlp_out" if m else ""


def load_saelens(path: str, hook_name_out: str | None = None) -> SAE:
    """Load a SAELens folder (v6 or legacy cfg): SAEs of architecture standard / topk / jumprelu / gated (a
    BatchTopK or Matryoshka BatchTopK SAE is saved by SAELens as a jumprelu), and transcoders (transcoder,
    skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder). Every ``normalize_activations``: none and
    expected_average_only_in (folded by SAELens before saving) load as they are; constant_norm_rescale and
    layer_norm are applied per token at run time (``SAE.normalize_input``), as SAELens does. hook_z SAEs
    (``reshape_activations="hook_z"``) read the heads flattened, [..., n_heads * d_head]; spliced into a model they
    are reshaped as SAELens does. SAELens does not record where a transcoder writes: ``hook_name_out`` says it,
    by default the ``hook_mlp_out`` of the block whose MLP input the transcoder reads."""
    d = read_json(os.path.join(path, SAELENS_CONFIG), "SAE config")
    t = _load_tensors(os.path.join(path, SAELENS_WEIGHTS))
    meta = d.get("metadata") or {}
    arch = d.get("architecture", "standard")
    norm = d.get("normalize_activations", "none") or "none"
    if norm not in ("none", "expected_average_only_in") + RUN_TIME_NORMS:
        raise ValueError(
            f"{path}: normalize_activations = {norm!r} is not supported; supported: none, "
            f"expected_average_only_in, {', '.join(RUN_TIME_NORMS)} (SAELens's {norm!r} needs statistics that "
            f"are not in the file: fold them into the weights and save with 'none')."
        )
    norm = norm if norm in RUN_TIME_NORMS else "none"  # (expected_average_only_in: SAELens folded it on save)
    reshape = d.get("reshape_activations", "none") or "none"
    if reshape not in ("none", "hook_z"):
        raise ValueError(f"{path}: reshape_activations = {reshape!r} is not supported (none, hook_z).")
    if arch not in SAELENS_ARCHITECTURES:
        raise ValueError(f"{path}: SAELens architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SAELENS_ARCHITECTURES)}.")
    ours, transcoder, skip = SAELENS_ARCHITECTURES[arch]
    hook = meta.get("hook_name", d.get("hook_name", "")) or ""
    if reshape == "hook_z" and not hook.endswith("hook_z"):
        raise ValueError(f"{path}: reshape_activations = 'hook_z' but the hook is {hook!r}; expected an attention "
                         f"hook_z (e.g. 'blocks.0.attn.hook_z').")
    d_in = int(d["d_in"])
    d_sae = int(d["d_sae"])
    out_hook = ""
    if transcoder:
        out_hook = (hook_name_out if hook_name_out is not None
                    else meta.get("hooked_mlx_hook_name_out") or transcoder_output_hook(hook))
        if not out_hook:
            raise ValueError(f"{path}: a SAELens {arch} reading {hook or 'an unnamed hook'!r}; SAELens does not "
                             f"record where it writes. Pass hook_name_out=... (e.g. 'blocks.3.hook_mlp_out').")
    cfg = SAEConfig(
        architecture=ours, d_in=d_in, d_sae=d_sae, k=int(d.get("k", SAEConfig.defaults()["k"])),
        apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)), hook_name=hook,
        d_out=int(d.get("d_out", 0)) if transcoder else 0, hook_name_out=out_hook, skip_connection=skip,
        model_name=meta.get("model_name", d.get("model_name", "")) or "",
        decoder_unit_norm=False, normalize_activations=norm,
        extra={"imported_from": "saelens", "path": os.path.abspath(path)},
    )
    keys = ("W_enc", "b_enc", "W_dec", "b_dec") + (("W_skip",) if skip else ())
    if ARCHS[ours].gated:  # SAELens's magnitude bias b_mag is our b_enc
        keys = ("W_enc", "b_gate", "r_mag", "W_dec", "b_dec")
        t = {("b_enc" if k == "b_mag" else k): v for k, v in t.items()}
        keys += ("b_enc",)
    tensors: dict[str, mx.array] = {k: t[k] for k in keys if k in t}
    if ARCHS[ours].threshold == "learned":
        if "threshold" in t:
            tensors["threshold"] = t["threshold"]
        elif "log_threshold" in t:
            tensors["threshold"] = mx.exp(t["log_threshold"])
    unexpected = sorted(set(t) - set(tensors) - {"log_threshold"})
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected} for architecture {arch!r}.")
    sae = build_sae(cfg, tensors, path)
    if ARCHS[ours].inference == "topk" and d.get("rescale_acts_by_decoder_norm", False):
        # SAELens: h *= ||W_dec,i|| before top-k, decode with W_dec / ||W_dec,i||. Fold (SAELens _fold_norm_topk).
        n = sae.decoder_norms()
        sae.W_enc = sae.W_enc * n
        sae.b_enc = sae.b_enc * n
        sae.W_dec = sae.W_dec / n[:, None]
        mx.eval(sae.parameters())
    return sae


# ---------------------------------------------------------------------------------------------------
# sparsify
# ---------------------------------------------------------------------------------------------------


def sparsify_hook_name(hookpoint: str) -> str:
    """Canonical hook name of a sparsify hookpoint (``layers.3`` -> ``blocks.3.hook_resid_post``)."""
    for pat, tmpl in SPARSIFY_HOOKPOINTS.items():
        m = re.match(pat, hookpoint)
        if m:
            return tmpl.format(l=m.group(1)) if m.groups() else tmpl
    return hookpoint


def export_sparsify(sae: SAE, path: str, hookpoint: str | None = None, *, overwrite: bool = False) -> str:
    """Write a sparsify folder (TopK SAEs only). ``hookpoint``: a subfolder name (e.g. ``layers.3``). The
    folder written must be new or empty unless ``overwrite``."""
    if sae.cfg.is_transcoder:
        raise ValueError("export_sparsify writes SAEs; this is a transcoder. Use export_saelens (SAELens has "
                         "transcoder formats).")
    if not sae.cfg.arch.sparsify:
        raise ValueError(f"sparsify stores TopK SAEs only; this SAE is {sae.cfg.architecture!r} (use export_saelens).")
    if not sae.cfg.apply_b_dec_to_input:
        raise ValueError("sparsify always subtracts b_dec from the input; this SAE has apply_b_dec_to_input=False.")
    folder = os.path.join(path, hookpoint) if hookpoint else path
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.d_sae // sae.d_in),
        "normalize_decoder": True,
        "num_latents": sae.d_sae,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.d_in,
    }
    tensors = {"encoder.weight": mx.array(sae.W_enc.T), "encoder.bias": sae.b_enc, "W_dec": sae.W_dec,
               "b_dec": sae.b_dec}
    _atomic_write_dir(folder, {SPARSIFY_WEIGHTS: ({k: v.astype(mx.float32) for k, v in tensors.items()}, None),
                               SPARSIFY_CONFIG: cfg}, overwrite=overwrite, what="export_sparsify")
    return folder


def load_sparsify(path: str, hookpoint: str | None = None) -> SAE:
    """Load a sparsify SAE folder, or one hookpoint of a multi-hookpoint root (``hookpoint=``)."""
    folder = path
    if not os.path.exists(os.path.join(path, SPARSIFY_WEIGHTS)):
        subs = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f, SPARSIFY_WEIGHTS)))
        if hookpoint is None:
            if len(subs) != 1:
                raise ValueError(f"{path} holds sparsify SAEs for hookpoints {subs}; pass hookpoint= one of them.")
            hookpoint = subs[0]
        if hookpoint not in subs:
            raise ValueError(f"{path} has no sparsify SAE for hookpoint {hookpoint!r}; available: {subs}.")
        folder = os.path.join(path, hookpoint)
    elif hookpoint is None:
        hookpoint = os.path.basename(os.path.normpath(path))
    d = read_json(os.path.join(folder, SPARSIFY_CONFIG), "SAE config")
    act = d.get("activation", "topk")
    if act != "topk":
        raise ValueError(f"{folder}: sparsify activation {act!r} is not supported (only 'topk').")
    for flag in ("skip_connection", "transcode"):
        if d.get(flag):
            raise ValueError(f"{folder}: sparsify {flag}=true (transcoders / skip connections) is not supported.")
    t = _load_tensors(os.path.join(folder, SPARSIFY_WEIGHTS))
    W_enc = t["encoder.weight"].T
    F, D = t["encoder.weight"].shape
    d_in = int(d.get("d_in", D))
    if d_in != D:
        raise ValueError(f"{folder}: cfg d_in {d_in} but encoder.weight is [{F}, {D}].")
    W_dec = t["W_dec"]
    if tuple(W_dec.shape) == (D, F) and D != F:
        W_dec = W_dec.T  # tolerate files written with a transposed decoder
    cfg = SAEConfig(
        architecture="topk", d_in=D, d_sae=F, k=int(d["k"]), hook_name=sparsify_hook_name(hookpoint or ""),
        decoder_unit_norm=bool(d.get("normalize_decoder", True)), normalize_activations="none",
        extra={"imported_from": "sparsify", "hookpoint": hookpoint, "path": os.path.abspath(folder)},
    )
    return build_sae(cfg, {"W_enc": W_enc, "b_enc": t["encoder.bias"], "W_dec": W_dec, "b_dec": t["b_dec"]}, folder)
