"""``HookedConfig``: the canonical model config, built from a Hugging Face / mlx-lm ``config.json``.

Both generations of transformers config are read: the older keys (``rope_theta``, ``rope_scaling``,
``rotary_pct``, ``rotary_emb_base``, ``n_ctx``, ...) and transformers 5's ``rope_parameters`` block, which
holds RoPE settings only there (mlx-lm 0.32 misses it for some families and silently uses defaults).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

FORMAT_VERSION = 1

Normalization = Literal["rms", "rms_offset", "ln"]
QKNorm = Literal["head", "full"]
Positional = Literal["rotary", "learned"]
LayerType = Literal["full_attention", "sliding_attention"]
DType = Literal["float32", "bfloat16", "float16"]


@dataclass
class HookedConfig:
    """Architecture hyper-parameters in TransformerLens's vocabulary."""

    architecture: str  # the mlx-lm / HF model_type ("llama", "qwen3", ...)
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    # None (the default) is resolved in __post_init__: the fields below are never None on an instance
    n_key_value_heads: int = None  # type: ignore[assignment]  # None: n_heads (no GQA)
    n_ctx: int = 2048
    # normalisation: "rms" (w * x/rms), "rms_offset" (Gemma: (1 + w) * x/rms), "ln" (LayerNorm with bias)
    normalization: Normalization = "rms"
    norm_eps: float = 1e-5
    # MLP
    act_fn: str = "silu"
    gated_mlp: bool = True
    mlp_bias: bool = False
    # attention
    attention_bias: bool = False  # q/k/v biases
    o_bias: bool = False
    qk_norm: QKNorm | None = None  # None, "head" (Qwen3, Gemma-3) or "full" (OLMo2)
    attn_scale: float = None  # type: ignore[assignment]  # multiplier on q.k; None: d_head ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: list[LayerType] = None  # type: ignore[assignment]  # None: all full; per layer "full_attention" / "sliding_attention"
    # positions
    positional: Positional = "rotary"  # "rotary" or "learned"
    rotary_dim: int = None  # type: ignore[assignment]  # None: all of d_head
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_traditional: bool = False
    rope_local_theta: float | None = None  # base for sliding layers (Gemma-3)
    # block structure
    parallel_attn_mlp: bool = False
    post_norms: bool = False  # ln1_post / ln2_post after attention / MLP (Gemma-2/3, OLMo2)
    pre_norms: bool = True  # False for post-norm-only blocks (OLMo2)
    embed_scale: float | None = None
    tie_word_embeddings: bool = False
    # MoE
    num_experts: int | None = None
    experts_per_token: int | None = None
    norm_topk_prob: bool = True
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    default_prepend_bos: bool = True
    # weights
    quantization: dict | None = None
    dtype: DType = "float32"
    processing: dict = field(default_factory=dict)  # weight processing applied (fold_ln, ...)
    extra: dict = field(default_factory=dict)  # family-specific values

    def __post_init__(self):
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_key_value_heads ({self.n_key_value_heads})."
            )
        if self.rotary_dim is None:
            self.rotary_dim = self.d_head
        if self.attn_scale is None:
            self.attn_scale = self.d_head**-0.5
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.n_layers
        self._check_choices()

    def _check_choices(self) -> None:
        """Every ``Literal`` field (and each entry of ``layer_types``) holds one of its allowed values."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            allowed = _literal_values(hints[f.name])
            if not allowed:
                continue
            value = getattr(self, f.name)
            values = value if isinstance(value, list) else [value]
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(
                    f"HookedConfig.{f.name} = {value!r} is not valid: {bad[0]!r} is not one of "
                    f"{sorted(str(a) for a in allowed)}. Fix the value in the checkpoint's config (or the family's "
                    f"config mapping in hooked_mlx/models/).")

    def moe_experts(self) -> tuple[int, int]:
        """(num_experts, experts_per_token) of a mixture-of-experts config."""
        if self.num_experts is None or self.experts_per_token is None:
            raise ValueError(f"The {self.architecture} config has num_experts = {self.num_experts} and "
                             f"experts_per_token = {self.experts_per_token}; a mixture-of-experts family needs both "
                             f"(num_local_experts / num_experts and num_experts_per_tok in config.json).")
        return self.num_experts, self.experts_per_token

    # TL names
    @property
    def n_kv_heads(self) -> int:
        return self.n_key_value_heads

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def model_type(self) -> str:
        return self.architecture

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HookedConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown HookedConfig keys {sorted(unknown)}; valid keys: {sorted(names)}.")
        return cls(**d)


def _literal_values(hint) -> tuple:
    """The allowed values of a ``Literal`` hint, also inside ``X | None`` and ``list[X]`` (None included where
    the hint allows it); () for any other hint."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return typing.get_args(hint)
    if origin in (list, typing.Union) or str(origin) == "<class 'types.UnionType'>":
        out: tuple = ()
        for arg in typing.get_args(hint):
            if arg is type(None):
                out += (None,)
            else:
                out += _literal_values(arg)
        return out if any(v is not None for v in out) else ()
    return ()


# -- helpers for family config mappings -----------------------------------------------------------------


def require(d: dict, *keys: str, default: Any = dataclasses.MISSING, what: str = "config.json"):
    """The first of ``keys`` present in ``d`` (HF configs name things several ways)."""
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    if default is not dataclasses.MISSING:
        return default
    raise ValueError(f"{what} lacks {' / '.join(repr(k) for k in keys)}, which this architecture needs.")


def rope_settings(d: dict, layer_type: str = "full_attention", default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config style.

    transformers 5 writes ``rope_parameters = {"rope_type": ..., "rope_theta": ..., factor, ...}``, or one
    such dict per layer type (``{"full_attention": {...}, "sliding_attention": {...}}``). Older configs
    write ``rope_theta`` (or ``rotary_emb_base``) and ``rope_scaling``.
    """
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and rp:
        if layer_type in rp and isinstance(rp[layer_type], dict):
            rp = rp[layer_type]
        elif "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = rp["full_attention"]
        theta = float(rp.get("rope_theta", d.get("rope_theta", default_theta)))
        rtype = rp.get("rope_type", rp.get("type", "default"))
        scaling = None
        if rtype not in (None, "default"):
            scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
            scaling.setdefault("rope_type", rtype)
        return theta, scaling
    theta = float(d.get("rope_theta", d.get("rotary_emb_base", default_theta)))
    scaling = d.get("rope_scaling")
    if isinstance(scaling, dict):
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        if rtype == "default":
            scaling = None
    return theta, scaling


def partial_rotary_factor(d: dict, default: float = 1.0) -> float:
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and "partial_rotary_factor" in rp:
        return float(rp["partial_rotary_factor"])
    return float(d.get("partial_rotary_factor", d.get("rotary_pct", default)))


def token_ids(d: dict) -> dict:
    return {
        "bos_token_id": d.get("bos_token_id"),
        "eos_token_id": d.get("eos_token_id"),
        "pad_token_id": d.get("pad_token_id"),
    }
