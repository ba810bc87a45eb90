"""Every canonical hook name, its shape, and ``get_act_name`` -- the one place hook names live.

Notation: B batch, P pos, H n_heads, Hkv n_key_value_heads, dh d_head, dm d_model, dmlp d_mlp,
V d_vocab, E num_experts, k experts per token.

The names and shapes follow TransformerLens (TL). Differences from TL, on purpose:
* every hook always exists (``hook_mlp_in`` included). ``attn.hook_result`` too, but as in TL "every hook"
  (``run_with_cache()``) and filter functions leave it out until ``set_use_attn_result(True)``; named, it fires;
* ``ln1`` runs once per block, so its hooks fire once;
* per-head q/k norms (Qwen3, Gemma-3) keep the 4-D shape [B,P,H,dh] (TL flattens to 2-D).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cache

#: hooks that exist once per model: name -> (shape, meaning)
TOP_HOOKS: dict[str, tuple[str, str]] = {
    "hook_embed": ("[B,P,dm]", "token embedding (after any embedding scale)"),
    "hook_pos_embed": ("[B,P,dm]", "learned position embedding (models with learned positions only)"),
    "ln_final.hook_scale": ("[B,P,1]", "final norm: sqrt(mean(x^2)+eps) (RMSNorm) or std (LayerNorm)"),
    "ln_final.hook_normalized": ("[B,P,dm]", "final norm output before its weight"),
    "unembed.hook_in": ("[B,P,dm]", "input of the unembedding (after ln_final)"),
    "unembed.hook_out": ("[B,P,V]", "logits, before any final soft-cap"),
}

#: hooks that exist once per block, relative to ``blocks.{l}.``: name -> (shape, meaning)
BLOCK_HOOKS: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("[B,P,dm]", "residual stream entering the block"),
    "ln1.hook_scale": ("[B,P,1]", "attention-input norm scale"),
    "ln1.hook_normalized": ("[B,P,dm]", "attention-input norm output before its weight"),
    "hook_attn_in": ("[B,P,H,dm]", "the residual repeated per query head, before ln1 (set_use_attn_in; computed "
                     "only when hooked)"),
    "hook_q_input": ("[B,P,H,dm]", "each query head's own input, before ln1 (set_use_split_qkv_input)"),
    "hook_k_input": ("[B,P,Hkv,dm]", "each key head's own input, before ln1 (set_use_split_qkv_input)"),
    "hook_v_input": ("[B,P,Hkv,dm]", "each value head's own input, before ln1 (set_use_split_qkv_input)"),
    "attn.hook_q": ("[B,P,H,dh]", "queries, before any q norm and rotary"),
    "attn.hook_k": ("[B,P,Hkv,dh]", "keys of the new positions, before any k norm and rotary (n_kv heads under GQA)"),
    "attn.hook_v": ("[B,P,Hkv,dh]", "values of the new positions (n_kv heads under GQA)"),
    "attn.hook_rot_q": ("[B,P,H,dh]", "queries after rotary"),
    "attn.hook_rot_k": ("[B,P,Hkv,dh]", "keys after rotary"),
    "attn.hook_attn_scores": ("[B,H,Pq,Pk]", "scaled, soft-capped and masked (-inf) attention logits"),
    "attn.hook_pattern": ("[B,H,Pq,Pk]", "attention probabilities"),
    "attn.hook_z": ("[B,P,H,dh]", "pattern @ v, per query head"),
    "attn.hook_result": ("[B,P,H,dm]", "per-head output z_h @ W_O[h], before b_O"),
    "hook_attn_out": ("[B,P,dm]", "attention output (with b_O and any post-attention norm)"),
    "hook_resid_mid": ("[B,P,dm]", "residual between attention and MLP (absent in parallel blocks)"),
    "hook_mlp_in": ("[B,P,dm]", "the MLP's copy of its input, before ln2 (resid_mid; resid_pre in parallel blocks): "
                    "changing it changes the MLP's input only, not the residual stream"),
    "ln2.hook_scale": ("[B,P,1]", "MLP-input norm scale"),
    "ln2.hook_normalized": ("[B,P,dm]", "MLP-input norm output before its weight"),
    "mlp.hook_pre": ("[B,P,dmlp]", "plain MLP: x@W_in+b_in; gated MLP: the gate branch x@W_gate"),
    "mlp.hook_pre_linear": ("[B,P,dmlp]", "gated MLP only: the linear branch x@W_in"),
    "mlp.hook_post": ("[B,P,dmlp]", "plain: act(pre); gated: act(pre) * pre_linear"),
    "hook_mlp_out": ("[B,P,dm]", "MLP output (with b_out and any post-MLP norm)"),
    "hook_resid_post": ("[B,P,dm]", "residual stream leaving the block"),
}

#: family-specific block hooks (present only in the families that have the component)
EXTRA_BLOCK_HOOKS: dict[str, tuple[str, str]] = {
    "attn.q_norm.hook_scale": ("[B,P,H,1] (per head) or [B,P,1] (full)", "query norm scale"),
    "attn.q_norm.hook_normalized": ("[B,P,H,dh] or [B,P,H*dh]", "query norm output before its weight"),
    "attn.k_norm.hook_scale": ("[B,P,Hkv,1] or [B,P,1]", "key norm scale"),
    "attn.k_norm.hook_normalized": ("[B,P,Hkv,dh] or [B,P,Hkv*dh]", "key norm output before its weight"),
    "ln1_post.hook_scale": ("[B,P,1]", "post-attention norm scale (Gemma-2/3, OLMo2)"),
    "ln1_post.hook_normalized": ("[B,P,dm]", "post-attention norm output before its weight"),
    "ln2_post.hook_scale": ("[B,P,1]", "post-MLP norm scale (Gemma-2/3, OLMo2)"),
    "ln2_post.hook_normalized": ("[B,P,dm]", "post-MLP norm output before its weight"),
    "mlp.hook_expert_weights": ("[B*P,E]", "router softmax over all experts"),
    "mlp.hook_expert_indices": ("[B*P,k]", "indices of the experts each token is routed to"),
    "mlp.hook_expert_pre": ("[B,P,k,dmlp]", "MoE: gate branch x@W_gate[e] of each routed expert"),
    "mlp.hook_expert_pre_linear": ("[B,P,k,dmlp]", "MoE: linear branch x@W_in[e] of each routed expert"),
    "mlp.hook_expert_post": ("[B,P,k,dmlp]", "MoE: act(pre) * pre_linear of each routed expert"),
    "mlp.hook_expert_out": ("[B,P,k,dm]", "MoE: each routed expert's output, before its routing weight"),
    "mlp.shared_expert.hook_pre": ("[B,P,dmlp_shared]", "Qwen2-MoE shared expert: gate branch"),
    "mlp.shared_expert.hook_pre_linear": ("[B,P,dmlp_shared]", "Qwen2-MoE shared expert: linear branch"),
    "mlp.shared_expert.hook_post": ("[B,P,dmlp_shared]", "Qwen2-MoE shared expert: act(pre) * pre_linear"),
}

#: every block hook, relative to ``blocks.{l}.``, in the order the forward pass reaches it (family-specific
#: hooks included; a family has a subset). ``hooks.HookedRootModule`` lists ``hook_dict`` in this order.
BLOCK_FORWARD_ORDER: tuple[str, ...] = (
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "hook_attn_in", "hook_q_input", "hook_k_input",
    "hook_v_input", "attn.hook_q", "attn.hook_k", "attn.hook_v",
    "attn.q_norm.hook_scale", "attn.q_norm.hook_normalized", "attn.k_norm.hook_scale", "attn.k_norm.hook_normalized",
    "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
    "attn.hook_result", "ln1_post.hook_scale", "ln1_post.hook_normalized", "hook_attn_out", "hook_resid_mid",
    "hook_mlp_in", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_expert_weights", "mlp.hook_expert_indices",
    "mlp.hook_expert_pre", "mlp.hook_expert_pre_linear", "mlp.hook_expert_post", "mlp.hook_expert_out",
    "mlp.shared_expert.hook_pre", "mlp.shared_expert.hook_pre_linear", "mlp.shared_expert.hook_post",
    "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "ln2_post.hook_scale", "ln2_post.hook_normalized",
    "hook_mlp_out", "hook_resid_post",
)
TOP_FORWARD_ORDER: tuple[str, ...] = ("hook_embed", "hook_pos_embed", "ln_final.hook_scale",
                                      "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out")

#: hook points an SAE spliced in at hook X adds, as ``X.<name>`` (SAELens's names; ``sae.splice``), in forward order
SAE_HOOKS: dict[str, str] = {
    "hook_sae_input": "the activation the SAE reads (attention hook_z: heads flattened)",
    "hook_sae_acts_pre": "the SAE's pre-activations [..., d_sae]",
    "hook_sae_acts_post": "the SAE's latents [..., d_sae]",
    "hook_sae_recons": "the reconstruction",
    "hook_sae_error": "activation - reconstruction (with use_error_term=True)",
    "hook_sae_output": "what replaces the activation",
}

# --- hook axes as data ------------------------------------------------------------------------------

#: the shape strings' symbols as axis names ("batch*pos": batch and positions flattened into one axis)
_AXIS = {"B": "batch", "P": "pos", "Pq": "query_pos", "Pk": "key_pos", "H": "head", "Hkv": "kv_head", "dh": "d_head",
         "dm": "d_model", "dmlp": "d_mlp", "dmlp_shared": "d_mlp", "V": "d_vocab", "E": "expert",
         "k": "expert_slot", "1": "one", "B*P": "batch*pos", "H*dh": "d_model_q", "Hkv*dh": "d_model_k"}


@dataclass(frozen=True)
class HookSpec:
    """A hook's place and axes: ``layer`` (None for the model-level hooks), ``axes`` (names in order, with
    the batch axis, e.g. ("batch", "pos", "head", "d_head") or ("batch*pos", "expert")), its meaning."""

    name: str
    layer: int | None
    axes: tuple[str, ...]
    meaning: str

    def _find(self, *names: str) -> int | None:
        for n in names:
            if n in self.axes:
                return self.axes.index(n)
        return None

    @property
    def batch_axis(self) -> int | None:
        """The batch axis (0), or None where batch and positions are flattened together."""
        return self._find("batch")

    @property
    def pos_axis(self) -> int | None:
        """The (query) position axis, or None (no position axis of its own)."""
        return self._find("pos", "query_pos")

    @property
    def key_pos_axis(self) -> int | None:
        return self._find("key_pos")

    @property
    def head_axis(self) -> int | None:
        """The head axis (query heads, or key/value heads: "kv_head"), or None."""
        return self._find("head", "kv_head")

    @property
    def flat_batch_pos(self) -> bool:
        """Batch and positions share axis 0 ([B*P, ...]: the router hooks of mixture-of-experts blocks)."""
        return "batch*pos" in self.axes


def _variants(shape: str) -> list[tuple[str, ...]]:
    out = []
    for part in re.findall(r"\[([^\]]+)\]", shape):
        out.append(tuple(_AXIS[sym.strip()] for sym in part.split(",")))
    return out


_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


@cache  # pure; interventions and pad handling ask it on every hooked call
def hook_spec(name: str, ndim: int | None = None) -> HookSpec:
    """The ``HookSpec`` of a hook name (``blocks.3.attn.hook_z``, ``hook_embed``, or block-relative
    ``attn.hook_z`` with layer None; ``_grad`` names are their activation's). ``ndim``: pick the shape variant
    of that rank where a family decides it (q/k norms per head or over all heads); default the first.
    Unknown names raise the usual error."""
    base = name[: -len("_grad")] if name.endswith("_grad") else name
    parent, _, local = base.rpartition(".")
    if local in SAE_HOOKS:  # a spliced SAE's hook: the parent's axes, heads flattened, latents on the last
        spec = hook_spec(parent)
        axes = spec.axes[:-2] + ("d_sae_in",) if spec.axes[-2:] in (("head", "d_head"), ("kv_head", "d_head")) \
            else spec.axes
        if local in ("hook_sae_acts_pre", "hook_sae_acts_post"):
            axes = axes[:-1] + ("d_sae",)
        return HookSpec(base, spec.layer, axes, SAE_HOOKS[local])
    m = _BLOCK_NAME.match(base)
    if m:
        layer, rel = int(m.group(1)), m.group(2)
        entry = BLOCK_HOOKS.get(rel) or EXTRA_BLOCK_HOOKS.get(rel)
    else:  # a model-level hook, or a block hook named relative to its block ("attn.hook_z"; layer None)
        layer, rel = None, base
        entry = TOP_HOOKS.get(rel) or BLOCK_HOOKS.get(rel) or EXTRA_BLOCK_HOOKS.get(rel)
    if entry is None:
        raise unknown_name_error(name, [*TOP_HOOKS, *(f"blocks.0.{r}" for r in BLOCK_FORWARD_ORDER)])
    variants = _variants(entry[0])
    axes = next((v for v in variants if ndim is not None and len(v) == ndim), variants[0])
    return HookSpec(base, layer, axes, entry[1])


@cache
def hook_order(name: str) -> tuple:
    """Sort key of a full hook name in forward order (model-level input hooks, blocks by layer, the rest; a
    spliced SAE's hooks right after their hook)."""
    parent, _, local = name.rpartition(".")
    if local in SAE_HOOKS:
        return hook_order(parent) + (list(SAE_HOOKS).index(local),)
    m = _BLOCK_NAME.match(name)
    if m:
        rel = m.group(2)
        i = BLOCK_FORWARD_ORDER.index(rel) if rel in BLOCK_FORWARD_ORDER else len(BLOCK_FORWARD_ORDER)
        return (1, int(m.group(1)), i)
    i = TOP_FORWARD_ORDER.index(name) if name in TOP_FORWARD_ORDER else len(TOP_FORWARD_ORDER)
    return (0 if i < 2 else 2, 0, i)


# --- get_act_name (TL's rules) ----------------------------------------------------------------------

_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
_LAYER_TYPES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ATTN = {"q", "k", "v", "z", "rot_q", "rot_k", "result", "pattern", "attn_scores"}
_MLP = {"pre", "post", "mid", "pre_linear"}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Expand a TL-style shorthand into a full hook name.

    ``get_act_name("pattern", 0)`` -> ``"blocks.0.attn.hook_pattern"``; ``get_act_name("resid_pre", 3)``
    -> ``"blocks.3.hook_resid_pre"``; ``get_act_name("k6")`` -> ``"blocks.6.attn.hook_k"``;
    ``get_act_name("scale", 2, "ln1")`` -> ``"blocks.2.ln1.hook_scale"``; ``get_act_name("embed")`` ->
    ``"hook_embed"``. A full name (containing "." or starting with "hook_") is returned unchanged.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    m = re.match(r"^([a-z]+)(\d+)([a-z]?.*)$", name)
    if m is not None and layer is None:
        name, layer, layer_type = m.group(1), int(m.group(2)), (m.group(3) or None)
    name = _ALIASES.get(name, name)
    if layer_type is not None:
        layer_type = _LAYER_TYPES.get(layer_type, layer_type)
    if name in ("scale", "normalized") and layer is None:
        return f"ln_final.hook_{name}"
    if layer is None:
        return f"hook_{name}"
    prefix = f"blocks.{layer}."
    if name in _ATTN:
        return f"{prefix}attn.hook_{name}"
    if name in _MLP:
        return f"{prefix}mlp.hook_{name}"
    if name in ("scale", "normalized"):
        if not layer_type:
            raise ValueError(
                f"get_act_name({name!r}, {layer}) needs a layer_type: 'ln1', 'ln2' (or 'ln1_post', 'ln2_post')"
            )
        return f"{prefix}{layer_type}.hook_{name}"
    if layer_type:
        return f"{prefix}{layer_type}.hook_{name}"
    return f"{prefix}hook_{name}"


def closest_names(name: str, valid, n: int = 5) -> list[str]:
    """The valid names closest to ``name`` (for error messages)."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    if not close:
        suffix = name.rsplit(".", 1)[-1]
        close = [v for v in valid if v.endswith(suffix)][:n]
    return close


def unknown_name_error(name: str, valid, what: str = "hook") -> ValueError:
    close = closest_names(name, valid)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    return ValueError(
        f"Unknown {what} name {name!r}.{hint} List every name with `model.hook_dict.keys()` "
        f"or `hooked-mlx hooks MODEL`."
    )
