"""Weight processing (TransformerLens's), off by default: raw weights reproduce mlx-lm's logits.

``process_weights(model, fold_ln=..., center_writing_weights=..., center_unembed=..., fold_value_biases=...)``
rewrites the weights in place, in TL's order, computing in float32. Each step leaves the log-probs unchanged
(up to float rounding); what it changes is what the hooks see.

* ``fold_ln``: every pre-norm's weight (Gemma: ``1 + w``) and bias are folded into the layers that read its
  output -- ``ln1`` into q/k/v, ``ln2`` into the MLP's input projections (MoE: router, experts and shared
  expert), ``ln_final`` into the unembedding: ``b += W @ b_ln``, ``W *= w_ln``. LayerNorm models also centre
  those reading weights over d_model (their input is mean-free). The norms stay in place as pure
  normalisations (weight 1 -- Gemma: stored 0 -- and bias 0), so ``ln*.hook_normalized`` and
  ``hook_scale`` keep their meaning. Post-norms (``ln1_post``/``ln2_post``) and q/k norms are not folded
  (TL leaves them weighted too).
* ``center_writing_weights`` (LayerNorm models only; TL's rule: RMSNorm does not remove the mean, so
  centring would change the function): W_E, W_pos, W_O, b_O, W_out, b_out lose their mean over d_model.
* ``center_unembed``: W_U and b_U lose their mean over the vocabulary. Logits shift by a per-position
  constant, log-probs do not change. Skipped with a warning when the final logits are soft-capped
  (the shift would not commute with tanh).
* ``fold_value_biases``: b_O += sum_h b_V[h] @ W_O[h] (GQA: each query head uses its kv head's b_V), b_V = 0.
  Exact because every attention pattern row sums to 1. A model without value biases has nothing to fold
  (recorded as applied: b_V = 0 holds).

A tied unembedding is untied before a step changes W_E or W_U. Quantized weights are dequantized first
(with a warning): processed weights are float weights. Applied steps are recorded in ``cfg.processing``,
so a canonical checkpoint written afterwards says what was done, and a step is never applied twice.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn

from .components import MLP, Embed, GatedMLP, Norm, Unembed
from .components.attention import linear_weight
from .components.moe import MoEMLP, SwitchLinear, switch_weight

#: the processing options, in the order they are applied (the CLI turns each into a ``--flag``)
PROCESSING_OPTIONS = ["fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"]


def process_weights(model, **options) -> dict:
    """Apply the requested steps to ``model`` in place; returns ``{step: True}`` for the steps applied now.

    Unknown options raise; a step the model has already had (``cfg.processing``) is skipped; a step that does
    not apply to the architecture (see module docstring) is skipped with a warning.
    """
    unknown = sorted(set(options) - set(PROCESSING_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown weight-processing option(s) {unknown}; valid options: {PROCESSING_OPTIONS}.")
    cfg = model.cfg
    todo = [s for s in PROCESSING_OPTIONS if options.get(s) and not cfg.processing.get(s)]
    if not todo:
        return {}
    if _is_quantized(model):
        warnings.warn(f"{cfg.architecture}: quantized weights are dequantized for weight processing "
                      f"({', '.join(todo)}); the processed model holds float weights.", stacklevel=3)
        dequantize_model(model)
    applied = {}
    for step in todo:
        reason = _STEPS[step](model)
        if reason:
            warnings.warn(f"{step} not applied to this {cfg.architecture} model: {reason}", stacklevel=3)
        else:
            applied[step] = True
            cfg.processing[step] = True
    object.__setattr__(model, "_compiled", None)  # the compiled fast path captured the old module tree
    model.setup()
    mx.eval(model.parameters())
    return applied


# -- helpers ----------------------------------------------------------------------------------------


def _f32(a: mx.array) -> mx.array:
    return a.astype(mx.float32)


def _set(module: nn.Module, name: str, value: mx.array, like: mx.array | None = None):
    """Set a parameter, keeping the dtype of ``like`` (or of the parameter it replaces)."""
    ref = like if like is not None else module.get(name)
    setattr(module, name, value.astype(ref.dtype) if ref is not None else value)


def _weight(layer: nn.Module) -> mx.array:
    return _f32(switch_weight(layer) if isinstance(layer, SwitchLinear) else linear_weight(layer))


def _is_quantized(model) -> bool:
    return any("scales" in m for _, m in model.named_modules() if isinstance(m, nn.Module))


def dequantize_model(model) -> None:
    """Replace every quantized layer by its float equivalent (dtype of its scales)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    for name, m in list(model.named_modules()):
        new: nn.Module
        if isinstance(m, QuantizedSwitchLinear):
            new = SwitchLinear(1, 1, 1)
            new.weight = switch_weight(m).astype(m.scales.dtype)
        elif isinstance(m, nn.QuantizedLinear):
            new = nn.Linear(1, 1, bias=False)
            new.weight = linear_weight(m).astype(m.scales.dtype)
        elif isinstance(m, nn.QuantizedEmbedding):
            new = Embed(1, 1)
            new.weight = linear_weight(m).astype(m.scales.dtype)
        else:
            continue
        if "bias" in m:
            new.bias = m.bias
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, new)
    model.cfg.quantization = None


def _parent(model, path: str):
    parts = path.split(".")
    obj = model
    for p in parts[:-1]:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    return obj, parts[-1]


def untie(model) -> None:
    """Give the model its own ``unembed.lm_head`` (a copy of the embedding) so W_E and W_U can differ."""
    cfg = model.cfg
    if not cfg.tie_word_embeddings:
        return
    w = linear_weight(model.embed)
    cfg.tie_word_embeddings = False
    unembed = Unembed(cfg)
    unembed.lm_head.weight = w
    model.unembed = unembed


def _mlp_readers(mlp: nn.Module) -> list[nn.Module]:
    if isinstance(mlp, MoEMLP):
        out: list[nn.Module] = [mlp.gate, mlp.switch_mlp.gate_proj, mlp.switch_mlp.up_proj]
        if "shared_expert" in mlp:
            out += [mlp.shared_expert.gate_proj, mlp.shared_expert.up_proj, mlp.shared_expert_gate]
        return out
    if isinstance(mlp, GatedMLP):
        return [mlp.gate_proj, mlp.up_proj]
    if isinstance(mlp, MLP):
        return [mlp.up_proj]
    raise TypeError(f"fold_ln does not know which layers read the input of {type(mlp).__name__}.")


def _mlp_writers(mlp: nn.Module) -> list[nn.Module]:
    if isinstance(mlp, MoEMLP):
        return [mlp.switch_mlp.down_proj] + ([mlp.shared_expert.down_proj] if "shared_expert" in mlp else [])
    return [mlp.down_proj]


def _fold_norm(norm: Norm, readers: list[nn.Module], center: bool, where: str) -> None:
    """Fold ``norm``'s weight and bias into the layers reading its output; leave it a pure normalisation."""
    w = _f32(norm.effective_weight())
    b = _f32(norm.bias) if "bias" in norm else None
    for layer in readers:
        W = _weight(layer)  # [..., out, dm]
        if b is not None and bool(mx.any(b != 0)):
            if "bias" not in layer:
                raise ValueError(f"fold_ln: {where} has a bias but a layer reading it has none; this "
                                 f"architecture's layout is not supported by fold_ln.")
            _set(layer, "bias", _f32(layer.bias) + W @ b)
        W = W * w
        if center:
            W = W - W.mean(axis=-1, keepdims=True)
        _set(layer, "weight", W)
    _set(norm, "weight", mx.zeros_like(w) if norm.kind == "rms_offset" else mx.ones_like(w))
    if "bias" in norm:
        _set(norm, "bias", mx.zeros_like(norm.bias))


# -- the steps (each returns None when applied, else why not) --------------------------------------------


def _fold_ln(model):
    cfg = model.cfg
    center = cfg.normalization == "ln"
    for i, block in enumerate(model.blocks):
        if "ln1" in block:
            _fold_norm(block.ln1, [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj], center,
                       f"blocks.{i}.ln1")
        if "ln2" in block:
            _fold_norm(block.ln2, _mlp_readers(block.mlp), center, f"blocks.{i}.ln2")
    untie(model)
    head = model.unembed.lm_head
    if "bias" in model.ln_final and "bias" not in head and bool(mx.any(model.ln_final.bias != 0)):
        head.bias = mx.zeros((head.weight.shape[0],), dtype=head.weight.dtype)
        cfg.extra["unembed_bias"] = True
    _fold_norm(model.ln_final, [head], center, "ln_final")
    return None


def _center_writing_weights(model):
    cfg = model.cfg
    if cfg.normalization != "ln":
        return "RMSNorm does not remove the residual's mean, so centring writing weights would change the " \
               "function (TransformerLens applies it to LayerNorm models only)."
    if cfg.post_norms:
        return "post-norm blocks read the sublayer outputs without centring them."
    untie(model)

    def center_rows(mod, axis):  # mean over the d_model axis
        W = _weight(mod)
        _set(mod, "weight", W - W.mean(axis=axis, keepdims=True))
        if "bias" in mod and axis != -1:
            bb = _f32(mod.bias)
            _set(mod, "bias", bb - bb.mean(axis=-1, keepdims=True))

    center_rows(model.embed, -1)
    if "pos_embed" in model:
        center_rows(model.pos_embed, -1)
    for block in model.blocks:
        center_rows(block.attn.o_proj, -2)
        for layer in _mlp_writers(block.mlp):
            center_rows(layer, -2)
    return None


def _center_unembed(model):
    if model.cfg.final_softcap:
        return "the final logits are soft-capped, and a per-position shift does not commute with tanh."
    untie(model)
    head = model.unembed.lm_head
    W = _weight(head)
    _set(head, "weight", W - W.mean(axis=0, keepdims=True))
    if "bias" in head:
        b = _f32(head.bias)
        _set(head, "bias", b - b.mean())
    return None


def _fold_value_biases(model):
    cfg = model.cfg
    if not any("bias" in b.attn.v_proj for b in model.blocks):
        return None  # no value biases: b_V = 0 already holds
    for block in model.blocks:
        attn = block.attn
        o = attn.o_proj
        if "bias" not in o:
            o.bias = mx.zeros((o.weight.shape[0],), dtype=linear_weight(o).dtype)
        if "bias" not in attn.v_proj:
            continue
        H, Hkv, dh = attn.n_heads, attn.n_kv_heads, attn.d_head
        bv = _f32(attn.v_proj.bias).reshape(Hkv, dh)
        bv = mx.repeat(bv, H // Hkv, axis=0).reshape(H * dh)  # query head h reads kv head h // (H/Hkv)
        _set(o, "bias", _f32(o.bias) + _weight(o) @ bv)
        _set(attn.v_proj, "bias", mx.zeros_like(attn.v_proj.bias))
    cfg.o_bias = True
    return None


_STEPS = {
    "fold_ln": _fold_ln,
    "center_writing_weights": _center_writing_weights,
    "center_unembed": _center_unembed,
    "fold_value_biases": _fold_value_biases,
}
