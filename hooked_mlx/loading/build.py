"""Building a ``HookedTransformer`` from a checkpoint (mlx-lm's ``utils.load`` is the model): dtype choice,
dequantizing or quantizing the modules, checked weight loading, the tokenizer wrapped, weight processing.

``load(path)`` reads a checkpoint (``checkpoint.read_checkpoint``) and builds the model; ``build_model(ck)``
builds from one already read. ``HookedTransformer.from_pretrained`` / ``from_checkpoint`` call these: the model
itself does no loading.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn

from ..config import DType, HookedConfig
from ..host import flat_items
from ..model import HookedTransformer
from .checkpoint import Checkpoint, dequantize_weights, quantization_params, read_checkpoint

_DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
           "float16": mx.float16, "fp16": mx.float16, "half": mx.float16}


def parse_dtype(dtype) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("mx.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("mx.")]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(set(_DTYPES))} or an mx.Dtype.")


def dtype_name(dtype: mx.Dtype) -> str:
    return {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(dtype, str(dtype))


def default_dtype(weights: dict) -> mx.Dtype:
    """The checkpoint's float dtype (its embedding's, or its scales' when quantized); float32 for half
    precision on the CPU backend, where MLX runs half-precision matmuls through a slow generic GEMM."""
    floats = [v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
    dt = floats[0] if floats else mx.float32
    if "embed.weight" in weights and mx.issubdtype(weights["embed.weight"].dtype, mx.floating):
        dt = weights["embed.weight"].dtype
    elif "embed.scales" in weights:
        dt = weights["embed.scales"].dtype
    if dt in (mx.float16, mx.bfloat16) and mx.default_device() == mx.cpu:
        dt = mx.float32
    return dt


def load(path_or_repo, dtype=None, dequantize: bool | None = None, revision: str | None = None,
         keep_quantized: bool = False, model_cls: type[HookedTransformer] = HookedTransformer,
         **processing) -> HookedTransformer:
    """``HookedTransformer.from_pretrained``: read the checkpoint, then ``build_model``."""
    return build_model(read_checkpoint(path_or_repo, revision=revision), dtype=dtype, dequantize=dequantize,
                       keep_quantized=keep_quantized, model_cls=model_cls, **processing)


def build_model(ck: Checkpoint, dtype=None, dequantize: bool | None = None, keep_quantized: bool = False,
                model_cls: type[HookedTransformer] = HookedTransformer, **processing) -> HookedTransformer:
    """The model of a read checkpoint (a ``model_cls``, e.g. ``HookedSAETransformer``), in ``dtype`` (default:
    the checkpoint's; float32 for half precision on the CPU backend), quantized or not (see
    ``HookedTransformer.from_pretrained``), with its tokenizer."""
    if dequantize and keep_quantized:
        raise ValueError("dequantize=True and keep_quantized=True contradict each other; pass one of them.")
    cfg, weights = ck.cfg, dict(ck.weights)
    dt = parse_dtype(dtype)
    model = model_cls(cfg)
    in_features = {name: m.weight.shape[-1] for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Embedding))}
    if dt is None:
        dt = default_dtype(weights)
    quantized = [k[: -len(".scales")] for k in weights if k.endswith(".scales")]
    if quantized and dequantize is None and not keep_quantized and mx.default_device() == mx.cpu:
        dequantize = True
        print(f"hooked_mlx: {ck.source} is quantized; dequantized to {dtype_name(dt)} for the CPU backend "
              f"(MLX's CPU quantized matmul is ~30x slower). Pass keep_quantized=True to keep it quantized.",
              file=sys.stderr)
    if quantized and dequantize:
        weights = dequantize_weights(weights, in_features, cfg.quantization, dt)
        cfg.quantization = None
        quantized = []
    if quantized:
        unknown = [p for p in quantized if p not in in_features]
        if unknown:
            raise ValueError(f"Quantized tensors for unknown modules {unknown[:5]} in {ck.source}.")
        params = {p: quantization_params(weights, p, in_features[p], cfg.quantization) for p in quantized}
        nn.quantize(model, class_predicate=lambda p, m: params.get(p, False))
        model.setup()  # mod_dict must hold the quantized modules
    weights = {k: (v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    load_weights_checked(model, weights, ck.source)
    cfg.dtype = cast(DType, dtype_name(dt))
    tok = ck.tokenizer
    if tok is None and ck.tokenizer_dir is not None:
        tok = load_tokenizer(ck.tokenizer_dir, cfg)
    elif tok is not None:
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        if not isinstance(tok, TokenizerWrapper):
            tok = TokenizerWrapper(tok, eos_token_ids=_eos_ids(cfg))
    object.__setattr__(model, "tokenizer", tok)
    object.__setattr__(model, "source", ck.source)
    object.__setattr__(model, "hf_config", ck.hf_config)
    object.__setattr__(model, "metadata", ck.metadata)
    if processing:
        from ..processing import process_weights  # added by the weight-processing work

        process_weights(model, **processing)
    mx.eval(model.parameters())
    return model


def _eos_ids(cfg: HookedConfig) -> list[int] | None:
    """The config's EOS id(s) as the list mlx-lm's tokenizer wrapper takes."""
    eos = cfg.eos_token_id
    return [eos] if isinstance(eos, int) else eos


def load_weights_checked(model: HookedTransformer, weights: dict[str, mx.array], source) -> None:
    """``model.load_weights`` after checking names and shapes against the model the config builds."""
    expected = dict(flat_items(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {source} does not match the {model.cfg.architecture} model built from its config: "
            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
            f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}. Is config.json from the same model?"
        )
    bad = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in expected.items()
           if tuple(weights[k].shape) != tuple(v.shape)]
    if bad:
        k, got, exp = bad[0]
        raise ValueError(f"Checkpoint {source}: {k} has shape {got}, the config implies {exp} "
                         f"({len(bad)} mismatched tensors).")
    model.load_weights(list(weights.items()), strict=True)


def load_tokenizer(path: Path, cfg: HookedConfig):
    """mlx-lm's tokenizer from a checkpoint folder (None when it has no tokenizer files)."""
    files = [f for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
             if (Path(path) / f).exists()]
    if not files:
        return None
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    try:
        return mlx_lm_load_tokenizer(Path(path), eos_token_ids=_eos_ids(cfg))
    except Exception as e:
        raise ValueError(f"Could not load the tokenizer in {path}: {type(e).__name__}: {e}") from e
