"""``HookedTransformer``: a native MLX transformer with TransformerLens's hook names and API."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from .components import Embed, Norm, TransformerBlock, Unembed
from .config import HookedConfig
from .hooks import HookedRootModule, HookPoint
from .host import to_ints
from .names import hook_spec
from .shapes import AttentionMask, Logits, Loss, Residual
from .weights_view import WeightsViewMixin

Input = str | Sequence[str] | mx.array | Sequence[int] | Sequence[Sequence[int]]

class HookedTransformer(WeightsViewMixin, HookedRootModule):
    """A decoder-only transformer whose every intermediate activation is a named ``HookPoint``.

    Module tree (= canonical weight names = hook names): ``embed`` (+ ``hook_embed``), optional
    ``pos_embed`` (+ ``hook_pos_embed``), ``blocks.{l}`` (``ln1``, ``attn``, ``ln2``, ``mlp``, hooks),
    ``ln_final``, ``unembed`` (``hook_in``, ``hook_out``).
    """

    def __init__(self, cfg: HookedConfig, tokenizer: Any = None):
        super().__init__()
        from .models import get_family

        object.__setattr__(self, "cfg", cfg)
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "_compiled", None)
        object.__setattr__(self, "_use_attn_result", False)  # TransformerLens's defaults (set_use_*)
        object.__setattr__(self, "_use_attn_in", False)
        object.__setattr__(self, "_use_split_qkv_input", False)
        object.__setattr__(self, "_cache_fns", {})  # run_with_cache's compiled forwards (_forward_storing)
        object.__setattr__(self, "_tracing_checked_tokens", False)
        object.__setattr__(self, "use_compile", os.environ.get("HOOKED_MLX_NO_COMPILE", "0") in ("", "0"))
        family = get_family(cfg.architecture)
        block_cls = getattr(family, "Block", TransformerBlock)
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()  # [B,P,dm]
        if cfg.positional == "learned":
            self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
            self.hook_pos_embed = HookPoint()  # [B,P,dm]
        self.blocks = [block_cls(cfg, i) for i in range(cfg.n_layers)]
        self.ln_final = Norm(cfg.d_model, cfg.normalization, cfg.norm_eps)
        self.unembed = Unembed(cfg, embed_of=lambda: self.embed)
        self.setup()

    # ------------------------------------------------------------------------------------------
    # loading
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        dtype=None,
        dequantize: bool | None = None,
        revision: str | None = None,
        keep_quantized: bool = False,
        **processing,
    ) -> HookedTransformer:
        """Load an mlx-lm / HF directory, a canonical hooked_mlx directory, a .gguf file or a hub id.

        dtype: "float32" / "bfloat16" / "float16" or an ``mx.Dtype`` (default: the checkpoint's; on the CPU
        backend half-precision checkpoints default to float32, which MLX's CPU runs much faster).
        Quantized checkpoints (mlx-lm, GGUF): on the CPU backend they are dequantized by default, with a
        one-line message (MLX's CPU quantized matmul is ~30x slower: SmolLM2's Q4_1 GGUF, a 2x64-token
        forward, 26.7 s against 0.89 s on a 2-core x86 machine); on a GPU they run quantized.
        ``keep_quantized=True`` keeps them quantized anywhere; ``dequantize=True`` dequantizes anywhere.
        Hub ids resolve through ``huggingface_hub`` (from the local cache when offline).
        """
        from .loading import load  # loading builds models; the model itself knows nothing of checkpoints

        return load(path_or_repo, dtype=dtype, dequantize=dequantize, revision=revision,
                    keep_quantized=keep_quantized, model_cls=cls, **processing)

    @classmethod
    def from_checkpoint(cls, ck, dtype=None, dequantize: bool | None = None, keep_quantized: bool = False,
                        **processing) -> HookedTransformer:
        """A model from a ``loading.Checkpoint`` already read (``hooked_mlx.loading.build_model``)."""
        from .loading import build_model

        return build_model(ck, dtype=dtype, dequantize=dequantize, keep_quantized=keep_quantized, model_cls=cls,
                           **processing)


    # ------------------------------------------------------------------------------------------
    # tokens
    # ------------------------------------------------------------------------------------------
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                "This model has no tokenizer (its checkpoint has no tokenizer files), so text input is not "
                "possible. Pass token ids (an mx.array [batch, pos] or a list of ints) instead."
            )
        return self.tokenizer

    @property
    def bos_token_id(self) -> int | None:
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None) if tok is not None else None
        return bos if bos is not None else self.cfg.bos_token_id

    def _tokenizer_adds_bos(self) -> bool:
        tok = self._require_tokenizer()
        bos = self.bos_token_id
        if bos is None:
            return False
        ids = tok.encode("a")
        return len(ids) > 0 and ids[0] == bos

    def _encode(self, text: str, prepend_bos: bool | None) -> list[int]:
        """Token ids of ``text``. The BOS rule (TransformerLens's ``default_prepend_bos=True``): where the
        tokenizer has a BOS token, every prompt starts with exactly one unless ``prepend_bos=False``;
        where it has none, prompts have none, and the model says so once."""
        tok = self._require_tokenizer()
        ids = list(tok.encode(text))
        bos = self.bos_token_id
        if bos is None:
            if prepend_bos:
                raise ValueError("prepend_bos=True but this tokenizer defines no BOS token.")
            if prepend_bos is None and not getattr(self, "_said_no_bos", False):
                object.__setattr__(self, "_said_no_bos", True)
                print("hooked_mlx: this tokenizer defines no BOS token, so prompts start without one "
                      "(TransformerLens would prepend its EOS token as BOS; position indices may differ by one).",
                      file=sys.stderr)
            return ids
        if prepend_bos is None:
            prepend_bos = True
        starts = len(ids) > 0 and ids[0] == bos  # added by the tokenizer, or written in the text itself
        if prepend_bos and not starts:
            ids = [bos] + ids
        elif not prepend_bos and starts and self._tokenizer_adds_bos():
            ids = ids[1:]
        return ids

    def to_tokens(self, input: str | Sequence[str], prepend_bos: bool | None = None,
                  padding_side: str = "right", truncate: bool = True, return_mask: bool = False):
        """Token ids [batch, pos] (int32). BOS as TransformerLens: prepended by default where the tokenizer
        has a BOS token (``prepend_bos=False`` leaves it out; see ``_encode``). A list of texts of unequal
        length is padded on ``padding_side`` with the pad id.

        return_mask: also return the attention mask [batch, pos] (bool, True = real token), to pass to
        ``forward`` / ``run_with_cache`` / ``generate`` as ``attention_mask=`` with these tokens. (Text input
        needs no mask argument: the model pads and masks it itself.)"""
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("to_tokens takes a string or a list of strings.")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        seqs = [self._encode(t, prepend_bos) for t in texts]
        empty = [i for i, s in enumerate(seqs) if not s]
        if empty:
            raise ValueError(
                f"Prompt {empty[0]} ({texts[empty[0]]!r}) has no tokens: it is empty and no BOS token is prepended. "
                f"Expected non-empty text; or pass prepend_bos=True if the tokenizer defines a BOS token."
            )
        longest = max(len(s) for s in seqs)
        if truncate and longest > self.cfg.n_ctx:
            warnings.warn(f"to_tokens: a prompt of {longest} tokens was truncated to the model's context of "
                          f"{self.cfg.n_ctx} tokens (n_ctx). Pass truncate=False to keep every token.",
                          UserWarning, stacklevel=2)
            seqs = [s[: self.cfg.n_ctx] for s in seqs]
        n = max(len(s) for s in seqs)
        pad = self.pad_token_id
        rows = [([pad] * (n - len(s)) + s) if padding_side == "left" else (s + [pad] * (n - len(s))) for s in seqs]
        tokens = mx.array(rows, dtype=mx.int32)
        if not return_mask:
            return tokens
        mask = [([False] * (n - len(s)) + [True] * len(s)) if padding_side == "left"
                else ([True] * len(s) + [False] * (n - len(s))) for s in seqs]
        return tokens, mx.array(mask, dtype=mx.bool_)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for cand in (getattr(tok, "pad_token_id", None) if tok is not None else None, self.cfg.pad_token_id,
                     getattr(tok, "eos_token_id", None) if tok is not None else None, self.cfg.bos_token_id):
            if isinstance(cand, int):
                return cand
        return 0

    def to_string(self, tokens) -> str | list[str]:
        """Decode [pos] -> str, or [batch, pos] -> list[str]."""
        tok = self._require_tokenizer()
        if isinstance(tokens, mx.array):
            tokens = tokens.tolist()
        if isinstance(tokens, int):
            tokens = [tokens]
        if tokens and isinstance(tokens[0], list):
            return [tok.decode(t) for t in tokens]
        return tok.decode(list(tokens))

    def to_str_tokens(self, input, prepend_bos: bool | None = None) -> list[str] | list[list[str]]:
        """Each token as its own string: from text, a [pos] or a [batch, pos] array."""
        tok = self._require_tokenizer()
        if isinstance(input, str):
            ids = self._encode(input, prepend_bos)
        elif isinstance(input, mx.array):
            if input.ndim == 2:
                return [cast(list[str], self.to_str_tokens(row)) for row in input]
            ids = to_ints(input)
        else:
            ids = list(input)
        return [tok.decode([int(i)]) if not hasattr(tok, "convert_ids_to_tokens") else _piece(tok, int(i)) for i in ids]

    def to_single_token(self, string: str) -> int:
        ids = self._encode(string, prepend_bos=False)
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens ({ids}), not a single token.")
        return ids[0]

    def get_token_position(self, single_token: str | int, input, mode: str = "first",
                           prepend_bos: bool | None = None) -> int:
        """Position of ``single_token`` in ``input`` (text or a 1-row token array); ``mode`` first/last."""
        tok_id = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        toks = self.to_tokens(input, prepend_bos=prepend_bos) if isinstance(input, str) else mx.array(input)
        if toks.ndim == 2:
            if toks.shape[0] != 1:
                raise ValueError(f"get_token_position needs one sequence, got batch {toks.shape[0]}.")
            toks = toks[0]
        hits = [i for i, t in enumerate(to_ints(toks)) if t == tok_id]
        if not hits:
            raise ValueError(f"Token {single_token!r} (id {tok_id}) does not occur in the input.")
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}.")
        return hits[0] if mode == "first" else hits[-1]

    def _as_tokens(self, input: Input, prepend_bos: bool | None = None, padding_side: str | None = "right",
                   return_mask: bool = False):
        """Token ids [B,P]; with ``return_mask`` also the padding mask (None unless text of unequal length)."""
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            toks, mask = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side or "right",
                                        return_mask=True)
            if bool(mask.all()):
                mask = None
            return (toks, mask) if return_mask else toks
        toks = self._as_token_array(input)
        return (toks, None) if return_mask else toks

    def _as_token_array(self, input) -> mx.array:
        if not isinstance(input, mx.array):
            try:
                input = mx.array(input)
            except Exception as e:
                raise TypeError(f"Input must be text, a list of texts, or token ids; got {type(input).__name__}.") from e
        if input.ndim == 1:
            input = input[None]
        if input.ndim != 2 or not mx.issubdtype(input.dtype, mx.integer):
            raise ValueError(
                f"Token input must be an integer array [batch, pos] (or [pos]); got shape {tuple(input.shape)} "
                f"and dtype {input.dtype}. Float activations go through start_at_layer instead."
            )
        if input.size == 0:
            raise ValueError(f"The token input is empty (shape {tuple(input.shape)}); expected at least one token "
                             f"per row. Pass non-empty text or token ids.")
        # (skipped while _forward_storing traces: it checked these very tokens before, and a trace cannot read)
        if not self._tracing_checked_tokens and (int(input.max()) >= self.cfg.d_vocab or int(input.min()) < 0):
            raise ValueError(f"Token ids must lie in [0, {self.cfg.d_vocab}); got min {int(input.min())}, "
                             f"max {int(input.max())}.")
        return input

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def embed_tokens(self, tokens: mx.array, positions: mx.array | None = None,
                     valid: mx.array | None = None) -> mx.array:
        """Residual stream entering block 0: [B,P] -> [B,P,dm].

        positions: absolute positions [B,P] for learned position embeddings (default 0..P-1); pad
        positions (``valid`` False) get a zero position embedding, as in TL."""
        x = self.embed(tokens)
        if self.cfg.embed_scale is not None:
            x = x * mx.array(self.cfg.embed_scale, dtype=x.dtype)
        x = self.hook_embed(x)
        if self.cfg.positional == "learned":
            if positions is None:
                positions = mx.arange(tokens.shape[1])
            pos = self.pos_embed(mx.clip(positions, 0, self.cfg.n_ctx - 1))
            if valid is not None:
                pos = pos * valid[..., None].astype(pos.dtype)
            x = x + self.hook_pos_embed(mx.broadcast_to(pos, x.shape))
        return x

    def _final(self, resid: mx.array) -> mx.array:
        logits = self.unembed(self.ln_final(resid), self.embed)
        if self.cfg.final_softcap:
            cap = self.cfg.final_softcap
            logits = mx.tanh(logits / cap) * cap
        return logits

    def _mask_setup(self, attention_mask: mx.array, q_len: int, past: int):
        """From a padding mask [B, past+P] (True = real token) build the block mask [B,1,P,past+P] (causal,
        no pad keys; a pad query attends only to itself so no row is empty), the per-row rotary offsets [B]
        and the absolute positions [B,P] of the new tokens (first real token = position 0)."""
        valid = attention_mask.astype(mx.bool_)
        B, K = valid.shape
        if K != past + q_len:
            raise ValueError(f"attention_mask has {K} positions; expected {past + q_len} (the {past} cached "
                             f"positions plus the {q_len} new ones).")
        vi = valid.astype(mx.int32)
        n_left = mx.argmax(vi, axis=1).astype(mx.int32)  # index of the first real token per row
        n_real = vi.sum(axis=1)
        last = K - 1 - mx.argmax(vi[:, ::-1], axis=1)
        if bool(((last - n_left + 1 != n_real) & (n_real > 0)).any()):
            raise ValueError("attention_mask must mark one contiguous run of real tokens per row (left or right "
                             "padding); got a row with a pad token between real tokens.")
        qi = mx.arange(past, past + q_len)
        kj = mx.arange(K)
        causal = kj[None, :] <= qi[:, None]  # [P,K]
        qvalid = valid[:, past:]
        mask = (causal[None] & valid[:, None, :]) | ((kj[None, :] == qi[:, None])[None] & ~qvalid[:, :, None])
        offsets = past - n_left
        positions = qi[None, :] - n_left[:, None]
        return mask[:, None], offsets, positions, qvalid

    def _run(self, tokens: mx.array | None, start_at_layer: int | None = None, stop_at_layer: int | None = None,
             residual: mx.array | None = None, mask: Any = "causal", cache: Any = None,
             attention_mask: mx.array | None = None) -> mx.array:
        n = self.cfg.n_layers
        start = 0 if start_at_layer is None else _layer_index(start_at_layer, n, "start_at_layer")
        stop = n if stop_at_layer is None else _layer_index(stop_at_layer, n, "stop_at_layer")
        if start > 0 and residual is None:
            raise ValueError("start_at_layer needs the residual stream entering that layer as input.")
        if residual is None:
            assert tokens is not None, "_run needs tokens or a residual"
            q_len = tokens.shape[1]
        else:
            q_len = residual.shape[1]
        past = int(cache[0].offset) if cache is not None and cache[0] is not None else 0
        offset = positions = valid = None
        if attention_mask is not None:
            mask, offset, positions, valid = self._mask_setup(attention_mask, q_len, past)
        elif past and self.cfg.positional == "learned":
            positions = mx.arange(past, past + q_len)
        x = residual if residual is not None else self.embed_tokens(cast(mx.array, tokens), positions, valid)
        for i in range(start, stop):
            x = self.blocks[i](x, mask, cache[i] if cache is not None else None, offset)
        return x if stop_at_layer is not None else self._final(x)

    def _fast_forward(self, tokens: mx.array) -> mx.array:
        if not self.use_compile:
            return self._run(tokens)
        if self._compiled is None:
            object.__setattr__(self, "_compiled", mx.compile(self._run, inputs=self.state))
        return self._compiled(tokens)

    def forward(
        self,
        input: Input,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        tokens: mx.array | None = None,
        past_kv_cache: Any = None,
        attention_mask: AttentionMask | None = None,
    ) -> Logits | Loss | tuple[Logits, Loss] | Residual | None:
        """Run the model.

        input: text, list of texts, token ids [B,P]; with ``start_at_layer`` a residual [B,P,dm].
        return_type: "logits" [B,P,V], "loss" (scalar mean next-token loss, or [B,P-1] with
        ``loss_per_token``), "both" (logits, loss), or None. ``stop_at_layer`` (exclusive) returns the
        residual stream [B,P,dm] entering that layer; ``start_at_layer`` (inclusive) takes it. Both accept
        negative values and combine (run blocks ``start..stop-1`` only).

        Batches of unequal length: a list of texts is padded on ``padding_side`` ("right" by default,
        or "left") and masked automatically: every row's logits equal that prompt run alone, pad tokens
        are never attended to and get no position, and the loss skips them. For pre-tokenized padded
        input pass ``attention_mask`` [B,P] (True/1 = real token), e.g. from
        ``model.to_tokens(texts, padding_side="left", return_mask=True)``. With ``past_kv_cache`` the mask
        covers the cached positions too ([B, past + P]).
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None; got {return_type!r}.")
        residual = None
        if start_at_layer is not None:
            residual = input if isinstance(input, mx.array) else mx.array(cast(list, input))
            if residual.ndim != 3 or residual.shape[-1] != self.cfg.d_model:
                raise ValueError(f"With start_at_layer the input is a residual [batch, pos, {self.cfg.d_model}]; "
                                 f"got shape {tuple(residual.shape)}.")
            toks = None if tokens is None else self._as_token_array(tokens)
            if toks is None and return_type in ("loss", "both") and stop_at_layer is None:
                raise ValueError("return_type='loss' with start_at_layer needs tokens=... for the targets.")
        else:
            toks, text_mask = self._as_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side,
                                              return_mask=True)
            if attention_mask is None:
                attention_mask = text_mask
        if attention_mask is not None:
            attention_mask = mx.array(attention_mask).astype(mx.bool_)
            if attention_mask.ndim == 1:
                attention_mask = attention_mask[None]
        if residual is not None:
            q_len = residual.shape[1]
        else:
            assert toks is not None
            q_len = toks.shape[1]
        past = int(past_kv_cache[0].offset) if past_kv_cache is not None and past_kv_cache[0] is not None else 0
        self.check_context(past + q_len)
        fast = (start_at_layer is None and stop_at_layer is None and past_kv_cache is None
                and attention_mask is None and not self.has_any_hooks)
        if fast:
            out = self._fast_forward(cast(mx.array, toks))  # fast: no start_at_layer, so tokens
        else:
            out = self._run(toks, start_at_layer, stop_at_layer, residual, cache=past_kv_cache,
                            attention_mask=attention_mask)
        if stop_at_layer is not None or return_type is None:
            return out if stop_at_layer is not None else None
        if return_type == "logits":
            return out
        assert toks is not None  # checked above: a loss needs tokens
        loss_mask = attention_mask
        if loss_mask is not None and loss_mask.shape[1] != toks.shape[1]:
            loss_mask = loss_mask[:, -toks.shape[1]:]
        loss = lm_cross_entropy(out, toks, per_token=loss_per_token, attention_mask=loss_mask)
        return loss if return_type == "loss" else (out, loss)

    __call__ = forward

    def check_context(self, n_tokens: int, what: str = "The input") -> None:
        """Sequences past the trained context ``n_ctx``: an error with learned position embeddings (there
        are none past it), a warning (once per model) with RoPE, which extrapolates with degraded quality."""
        n_ctx = self.cfg.n_ctx
        if n_tokens <= n_ctx:
            return
        if self.cfg.positional == "learned":
            raise ValueError(f"{what} has {n_tokens} positions, more than the model's context of {n_ctx} (n_ctx): "
                             f"its learned position embeddings stop at {n_ctx - 1}. Expected at most {n_ctx} tokens; "
                             f"shorten the input (to_tokens truncates to n_ctx by default).")
        if not getattr(self, "_warned_context", False):
            object.__setattr__(self, "_warned_context", True)
            warnings.warn(f"{what} has {n_tokens} positions, more than the trained context of {n_ctx} tokens "
                          f"(n_ctx). RoPE runs past it, but the model was not trained there: expect degraded "
                          f"outputs. (Warned once per model.)", UserWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------
    # hooks and caches
    # ------------------------------------------------------------------------------------------
    def attention_mask(self, input: Input, prepend_bos: bool | None = None, padding_side: str | None = None,
                       attention_mask: mx.array | None = None, **_) -> mx.array | None:
        """The padding mask [B,P] (bool, True = real token) that ``forward`` uses for this input, or None
        when nothing is padded. Same arguments as ``forward``; ``run_with_cache`` stores it as
        ``cache.attention_mask``."""
        if attention_mask is not None:
            m = mx.array(attention_mask).astype(mx.bool_)
            return m[None] if m.ndim == 1 else m
        if isinstance(input, mx.array) and input.ndim == 3:
            return None
        return self._as_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side, return_mask=True)[1]

    #: run_with_cache keywords the compiled caching forward takes as constants (any other: the hooked path)
    _COMPILED_CACHE_KWARGS = frozenset({"return_type", "stop_at_layer", "loss_per_token", "prepend_bos",
                                        "padding_side"})

    def _forward_storing(self, names, args, kwargs):
        """``run_with_cache``'s forward, compiled when nothing else is hooked: the hooked forward with a
        storing hook on each name is traced once per (names, keywords, input shape) and replayed as one fused
        graph (as the no-hook fast path is), instead of running op by op. The hooked path runs instead for
        padded batches, other hooks attached, ``return_type=None``, residual inputs and other keywords."""
        fallback = (not self.use_compile or self.has_any_hooks or len(args) != 1
                    or not set(kwargs) <= self._COMPILED_CACHE_KWARGS or kwargs.get("return_type", "logits") is None)
        if not fallback:
            try:
                static = tuple(sorted(kwargs.items()))
                hash(static)
            except TypeError:
                fallback = True
        if fallback:
            return super()._forward_storing(names, args, kwargs)
        # (checked token ids [B, P]; padded text keeps the hooked path)
        toks, mask = self._as_tokens(args[0], prepend_bos=kwargs.get("prepend_bos"),
                                     padding_side=kwargs.get("padding_side"), return_mask=True)
        if mask is not None:
            return super()._forward_storing(names, args, kwargs)
        key = (tuple(names), static)
        fns = self._cache_fns
        fn = fns.pop(key, None)
        if fn is None:
            fwd_kwargs = {k: v for k, v in kwargs.items() if k not in ("prepend_bos", "padding_side")}

            def run(tokens):
                object.__setattr__(self, "_tracing_checked_tokens", True)
                try:  # the hooked forward with its storing hooks, traced
                    return HookedRootModule._forward_storing(self, names, (tokens,), fwd_kwargs)
                finally:
                    object.__setattr__(self, "_tracing_checked_tokens", False)

            fn = mx.compile(run, inputs=self.state)
        fns[key] = fn  # most recently used last
        while len(fns) > 8:
            fns.pop(next(iter(fns)))
        return fn(toks)

    def _finish_cache(self, store: dict[str, mx.array], args, kwargs):
        """``run_with_cache``'s padding mask for this input, and the cached values with neutral pads."""
        input = args[0] if args else kwargs.get("input")
        mask = self.attention_mask(input, **{k: v for k, v in kwargs.items()
                                             if k in ("prepend_bos", "padding_side", "attention_mask")})
        if mask is not None:
            store = {k: _neutralise_pads(k, v, mask) for k, v in store.items()}
            mx.eval(store)
        return store, mask

    # ------------------------------------------------------------------------------------------
    # generation and lenses
    # ------------------------------------------------------------------------------------------
    def generate(self, input: Input = "", max_new_tokens: int = 10, **kwargs):
        """Generate with a KV cache and the active hooks; see ``hooked_mlx.generate.generate``."""
        from .generate import generate

        return generate(self, input, max_new_tokens, **kwargs)

    def logit_lens(self, input: Input, **kwargs):
        """Per-layer predictions of the residual stream; see ``hooked_mlx.lens.logit_lens``."""
        from .lens import logit_lens

        return logit_lens(self, input, **kwargs)

    # ------------------------------------------------------------------------------------------
    # misc
    # ------------------------------------------------------------------------------------------
    # TransformerLens's switches for optional hooks
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """As TransformerLens: with it off (the default), "every hook" (``run_with_cache()``) and filter functions
        leave ``attn.hook_result`` out, since materialising [B, P, H, d_model] per layer is costly; named
        explicitly it is always computed, and ``cache.compute_head_results()`` derives it from ``hook_z``."""
        object.__setattr__(self, "_use_attn_result", bool(use_attn_result))

    def opt_in_hooks_off(self) -> frozenset[str]:
        """The TransformerLens hooks that are switched off: ``attn.hook_result`` (``set_use_attn_result``),
        ``hook_attn_in`` (``set_use_attn_in``), ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input``
        (``set_use_split_qkv_input``)."""
        off = ([] if self._use_attn_result else ["attn.hook_result"]) + ([] if self._use_attn_in else ["hook_attn_in"])
        if not self._use_split_qkv_input:
            off += ["hook_q_input", "hook_k_input", "hook_v_input"]
        return frozenset(f"blocks.{l}.{n}" for l in range(self.cfg.n_layers) for n in off)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Accepted for TransformerLens code: ``hook_mlp_in`` always exists."""

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """As TransformerLens: with it on, "every hook" and filter functions include ``blocks.L.hook_q_input`` /
        ``hook_k_input`` / ``hook_v_input`` (each head's own copy of the residual, before ln1: patch one head's
        query input without touching the others). Named explicitly they fire anyway."""
        object.__setattr__(self, "_use_split_qkv_input", bool(use_split_qkv_input))

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """As TransformerLens: with it on, "every hook" and filter functions include ``blocks.L.hook_attn_in``
        [B, P, H, d_model] (the residual repeated per head, before ln1)."""
        object.__setattr__(self, "_use_attn_in", bool(use_attn_in))

    def loss_fn(self, logits: mx.array, tokens: mx.array, attention_mask: mx.array | None = None,
                per_token: bool = False) -> mx.array:
        """TransformerLens's ``loss_fn``: next-token cross-entropy of ``logits`` against ``tokens`` (float32),
        the mean or [B, P-1] per token; ``attention_mask`` [B, P] leaves pad predictions out."""
        return lm_cross_entropy(logits, mx.array(tokens), per_token=per_token,
                                attention_mask=None if attention_mask is None else mx.array(attention_mask))

    def state_dict(self) -> dict[str, mx.array]:
        """Every parameter by its dotted module path (``blocks.0.attn.q_proj.weight`` ...): the canonical
        names of ``save_canonical`` checkpoints, not TransformerLens's (its ``blocks.0.attn.W_Q`` is the view
        ``model.blocks[0].attn.W_Q`` here). ``model.load_weights(list(sd.items()))`` loads one back."""
        from .host import flat_items

        return dict(flat_items(self.parameters()))

    def num_params(self) -> int:
        from .host import flat_items

        total = 0
        for name, v in flat_items(self.parameters()):
            if name.endswith(".scales") or name.endswith(".biases"):
                continue
            if v.dtype == mx.uint32:
                # packed quantized weight: find its bits from the owning module
                mod = self.mod_dict.get(name.rsplit(".", 1)[0])
                total += v.size * 32 // getattr(mod, "bits", 4)
            else:
                total += v.size
        return total

    def __repr__(self):
        c = self.cfg
        q = f", quantized {c.quantization['bits']}-bit" if c.quantization else ""
        return (f"HookedTransformer({c.architecture}: {c.n_layers} layers, d_model {c.d_model}, "
                f"{c.n_heads} heads ({c.n_key_value_heads} kv), d_mlp {c.d_mlp}, vocab {c.d_vocab}, "
                f"{c.dtype}{q}, {len(self.hook_dict)} hooks)")


def lm_cross_entropy(logits: mx.array, tokens: mx.array, per_token: bool = False,
                     attention_mask: mx.array | None = None) -> mx.array:
    """Next-token cross-entropy in float32: [B,P-1] per token, or its mean.

    attention_mask [B,P] (True = real token): predictions from or of a pad token are excluded (0 in the
    per-token loss, left out of the mean)."""
    if tokens.shape[1] < 2:
        raise ValueError("A loss needs at least 2 tokens per sequence.")
    logp = nn.log_softmax(logits[:, :-1].astype(mx.float32), axis=-1)
    tgt = tokens[:, 1:]
    nll = -mx.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    if attention_mask is None:
        return nll if per_token else nll.mean()
    m = attention_mask.astype(mx.bool_)
    keep = (m[:, 1:] & m[:, :-1]).astype(nll.dtype)
    nll = nll * keep
    return nll if per_token else nll.sum() / mx.maximum(keep.sum(), 1)


def _neutralise_pads(name: str, act: mx.array, mask: mx.array) -> mx.array:
    """Set a cached activation's pad positions to a neutral value (see ``run_with_cache``).

    mask: [B, K] (True = real); the activation's positions are the last P of the K (a KV cache holds the
    first K - P)."""
    B = mask.shape[0]
    grad = name.endswith("_grad")
    spec = hook_spec(name, act.ndim)
    if spec.key_pos_axis is not None:  # pattern / scores [B, H, Pq, Pk]
        assert spec.pos_axis is not None
        Pq, Pk = act.shape[spec.pos_axis], act.shape[spec.key_pos_axis]
        keep = mask[:, -Pq:][:, None, :, None] & mask[:, -Pk:][:, None, None, :]
        fill = -mx.inf if spec.name.endswith("hook_attn_scores") and not grad else 0
        return mx.where(keep, act, mx.array(fill, act.dtype))
    if spec.flat_batch_pos:  # [B*P, ...]
        if act.shape[0] % B:
            return act
        P = act.shape[0] // B
        keep = mask[:, -P:].reshape((-1,) + (1,) * (act.ndim - 1))
        return mx.where(keep, act, mx.zeros_like(act))
    if spec.pos_axis != 1 or act.shape[0] != B or act.shape[1] > mask.shape[1]:
        return act
    P = act.shape[1]
    keep = mask[:, -P:].reshape((B, P) + (1,) * (act.ndim - 2))
    fill = 1 if spec.name.endswith("hook_scale") and not grad else 0
    return mx.where(keep, act, mx.array(fill, act.dtype))


def _layer_index(i: int, n: int, what: str) -> int:
    j = i + n if i < 0 else i
    if not 0 <= j <= n:
        raise ValueError(f"{what}={i} is out of range for a model with {n} layers (allowed: -{n}..{n}).")
    return j


def _piece(tok, i: int) -> str:
    """One token's text, as the tokenizer would print it within a sequence (SentencePiece '▁' -> ' ')."""
    piece = tok.convert_ids_to_tokens(i)
    if piece is None:
        return tok.decode([i])
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        try:
            return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
        except ValueError:
            return piece
    text = tok.decode([i])
    if piece.startswith("▁"):
        return " " + text.lstrip(" ") if text.strip() else piece.replace("▁", " ")
    if piece.startswith("Ġ"):
        return text if text.startswith(" ") else " " + text
    return text
