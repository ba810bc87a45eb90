"""``ActivationCache``: the activations of one run, by hook name, with TransformerLens's shorthands."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import mlx.core as mx
import numpy as np

from .names import get_act_name, hook_spec, unknown_name_error
from .shapes import ComponentAttrs, ResidStack


class ActivationCache:
    """Dict-like {hook name: activation}.

    Keys: full names (``"blocks.0.attn.hook_pattern"``), TL shorthands (``"pattern0"``, ``"embed"``) and
    tuples ``(name, layer[, layer_type])`` with negative layers counted from the end:
    ``cache["pattern", -1]``, ``cache["scale", 2, "ln1"]``. Gradients from ``incl_bwd=True`` are stored
    under ``NAME_grad``.
    """

    def __init__(self, cache_dict: dict[str, mx.array], model: Any = None, has_batch_dim: bool = True,
                 attention_mask: mx.array | None = None):
        self.cache_dict = dict(cache_dict)
        self.model = model
        self.has_batch_dim = has_batch_dim
        #: [B,P] bool (True = real token) for padded batches, else None. Cached values at pad positions are
        #: neutral (0; -inf for attention scores; 1 for norm scales), see ``HookedTransformer.run_with_cache``.
        self.attention_mask = attention_mask

    # -- lookup ------------------------------------------------------------------------------------
    def _key(self, key) -> str:
        if isinstance(key, tuple):
            name, *rest = key
            layer = rest[0] if rest else None
            layer_type = rest[1] if len(rest) > 1 else None
            if layer is not None and layer < 0:
                n_layers = self.model.cfg.n_layers if self.model is not None else None
                if n_layers is None:
                    raise ValueError("Negative layer indices need the cache's model (to know n_layers).")
                layer += n_layers
            grad = name.endswith("_grad")
            base = name[: -len("_grad")] if grad else name
            full = get_act_name(base, layer, layer_type)
            return full + "_grad" if grad else full
        if key in self.cache_dict:
            return key
        grad = key.endswith("_grad")
        base = key[: -len("_grad")] if grad else key
        full = get_act_name(base)
        return full + "_grad" if grad else full

    def __getitem__(self, key) -> mx.array:
        name = self._key(key)
        if name not in self.cache_dict:
            valid = list(self.cache_dict)
            if self.model is not None and name.removesuffix("_grad").endswith("attn.hook_result"):
                raise KeyError(
                    f"{name!r} was not cached: as in TransformerLens, per-head results are cached only after "
                    f"model.set_use_attn_result(True), or when the hook is named in names_filter. "
                    f"cache.compute_head_results() derives them from the cached hook_z.")
            if self.model is not None and name.removesuffix("_grad") in self.model.hook_dict:
                raise KeyError(
                    f"{name!r} is a valid hook but was not cached in this run (names_filter excluded it, "
                    f"stop_at_layer stopped before it, or incl_bwd was off for a _grad key). Cached: "
                    f"{len(valid)} names, e.g. {valid[:3]}."
                )
            raise KeyError(str(unknown_name_error(str(key), valid, what="cache key")))
        return self.cache_dict[name]

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except (ValueError, TypeError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {list(self.cache_dict)[:4]}{'...' if len(self) > 4 else ''})"

    # -- conversions -------------------------------------------------------------------------------
    def remove_batch_dim(self) -> ActivationCache:
        """Drop a batch dimension of size 1 (in place, like TL); errors if the batch is larger."""
        if not self.has_batch_dim:
            return self
        for name, act in self.cache_dict.items():
            if act.shape[0] != 1 and not _flat(name, act):
                raise ValueError(f"remove_batch_dim needs batch size 1; {name!r} has shape {tuple(act.shape)}.")
        self.cache_dict = {k: (v if _flat(k, v) else v[0]) for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[0]
        return self

    def to_numpy(self) -> dict[str, np.ndarray]:
        """A plain dict of NumPy arrays (bfloat16 is converted to float32, which NumPy lacks)."""
        out = {}
        for k, v in self.cache_dict.items():
            if v.dtype == mx.bfloat16:
                v = v.astype(mx.float32)
            out[k] = np.array(v)
        return out

    def apply_slice_to_batch_dim(self, batch_slice) -> ActivationCache:
        mask = self.attention_mask[batch_slice] if self.attention_mask is not None else None
        return ActivationCache({k: v[batch_slice] for k, v in self.cache_dict.items()}, self.model,
                               self.has_batch_dim, attention_mask=mask)

    # -- analysis (TL semantics) --------------------------------------------------------------------
    # Stacks are [n_components, *batch, pos, d_model] (batch absent after remove_batch_dim; pos absent
    # after an integer pos_slice). Labels follow TL: "{l}_pre", "{l}_mid", "final_post", "embed",
    # "pos_embed", "{l}_attn_out", "{l}_mlp_out", "L{l}H{h}", "L{l}N{n}", "bias", "remainder".

    def _require_model(self, what: str):
        if self.model is None:
            raise ValueError(f"{what} needs the model; build the cache with run_with_cache, or pass model= "
                             f"to ActivationCache.")
        return self.model

    def _n_layers(self) -> int:
        return self._require_model("This analysis").cfg.n_layers

    def _layer_arg(self, layer, what: str) -> int:
        n = self._n_layers()
        if layer is None or layer == -1:
            return n
        if not 0 <= layer <= n:
            raise ValueError(f"{what}: layer={layer} is out of range; use 0..{n} (or -1/None for all layers, "
                             f"i.e. up to the final residual).")
        return layer

    def _parallel(self) -> bool:
        return bool(self.model.cfg.parallel_attn_mlp)

    @staticmethod
    def _pos(x: mx.array, pos_slice, dim: int = -2) -> mx.array:
        """Apply a TL-style pos_slice along ``dim``, as TransformerLens's ``Slice`` reads it: None (all), an int
        (drops the dim), a tuple (``slice(*t)``: ``(2, 8)`` is positions 2..7, not [2, 8]), a slice, or a list
        / array of indices."""
        if pos_slice is None:
            return x
        dim = dim % x.ndim
        idx = (slice(None),) * dim
        if isinstance(pos_slice, tuple):
            pos_slice = slice(*pos_slice)
        elif isinstance(pos_slice, list):
            pos_slice = mx.array(pos_slice)
        return x[idx + (pos_slice,)]

    def _resid_at(self, layer: int, mlp_input: bool = False) -> mx.array:
        """The residual stream that ``layer`` reads: resid_pre (or resid_mid with ``mlp_input``), or the
        final resid_post for layer == n_layers."""
        n = self._n_layers()
        if layer == n:
            return self[("resid_post", n - 1)]
        if mlp_input and not self._parallel():
            return self[("resid_mid", layer)]
        return self[("resid_pre", layer)]

    def apply_ln_to_stack(self, residual_stack: ResidStack, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> ResidStack:
        """Normalise each component of a residual stack as the norm at ``layer`` would normalise the sum.

        layer None / -1 / n_layers: ``ln_final``; else ``ln1`` of that layer (``ln2`` with ``mlp_input``).
        The components are centred first for LayerNorm, then divided by the **cached** ``hook_scale`` of
        the full residual (so the normalised components still sum to the normalised residual); the norm's
        weight and bias are not applied (TL; after ``fold_ln`` there are none). ``recompute_ln=True``
        instead normalises every component by its own scale. A model without that norm returns the stack
        unchanged. Slices as TransformerLens: ``pos_slice`` says how the stack's positions were already sliced
        (the scale is sliced the same way); ``batch_slice`` slices the stack's batch axis (axis 1) here, and the
        scale's too (``has_batch_dim=False``: the stack has no batch axis, only the scale is sliced).
        """
        model = self._require_model("apply_ln_to_stack")
        n = model.cfg.n_layers
        layer = self._layer_arg(layer, "apply_ln_to_stack")
        if layer == n:
            norm, name = model.ln_final, "ln_final.hook_scale"
        else:
            block = model.blocks[layer]
            ln = "ln2" if mlp_input else "ln1"
            if ln not in block:
                return residual_stack
            norm, name = block[ln], f"blocks.{layer}.{ln}.hook_scale"
        x = residual_stack
        if batch_slice is not None and has_batch_dim:
            x = self._pos(x, batch_slice, dim=1)
        if norm.kind == "ln":
            x = x - x.mean(axis=-1, keepdims=True)
        if recompute_ln:
            x32 = x.astype(mx.float32)
            scale = mx.sqrt(mx.mean(mx.square(x32), axis=-1, keepdims=True) + norm.eps)
            return (x32 / scale).astype(x.dtype) if x.dtype != mx.float32 else x32 / scale
        if name not in self.cache_dict:
            raise KeyError(f"apply_ln_to_stack needs {name!r} in the cache (run_with_cache with a names_filter "
                           f"that includes it), or recompute_ln=True.")
        scale = self._pos(self.cache_dict[name], pos_slice, dim=-2)
        if batch_slice is not None and self.has_batch_dim:
            scale = self._pos(scale, batch_slice, dim=0)
        return x / scale

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False
                          ) -> ResidStack | tuple[ResidStack, list[str]]:
        """The residual stream before each layer up to ``layer``: [n, ..., d_model].

        Components ``{l}_pre`` for l in 0..layer (resid_pre of ``layer`` included), ``{l}_mid`` with
        ``incl_mid`` (l < layer) or ``mlp_input`` (l == layer), and ``final_post`` (the last resid_post)
        when layer is None / -1 / n_layers. ``apply_ln`` normalises with the cached scale of the norm that
        reads ``layer`` (see ``apply_ln_to_stack``). Parallel-block models have no resid_mid."""
        layer = self._layer_arg(layer, "accumulated_resid")
        n = self._n_layers()
        parallel = self._parallel()
        comps, labels = [], []
        for l in range(layer + 1):
            if l == n:
                comps.append(self[("resid_post", n - 1)])
                labels.append("final_post")
                continue
            comps.append(self[("resid_pre", l)])
            labels.append(f"{l}_pre")
            if not parallel and ((incl_mid and l < layer) or (mlp_input and l == layer)):
                comps.append(self[("resid_mid", l)])
                labels.append(f"{l}_mid")
        stack = mx.stack([self._pos(c, pos_slice) for c in comps])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True,
                        return_labels: bool = False) -> ResidStack | tuple[ResidStack, list[str]]:
        """The residual stream at ``layer`` as the sum of its writers: [n, ..., d_model].

        Components: ``embed``, ``pos_embed`` (learned positions), ``{l}_attn_out`` and ``{l}_mlp_out`` for
        l < layer, plus ``{layer}_attn_out`` with ``mlp_input`` (sequential blocks). ``mode`` "attn" / "mlp"
        keeps only one kind. With mode "all" and incl_embeds the components sum to resid_pre[layer] (or
        resid_mid with mlp_input, or the final residual for layer None / -1)."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp'; got {mode!r}.")
        layer = self._layer_arg(layer, "decompose_resid")
        comps, labels = [], []
        if incl_embeds:
            if "hook_embed" in self.cache_dict:
                comps.append(self["hook_embed"])
                labels.append("embed")
            if "hook_pos_embed" in self.cache_dict:
                comps.append(self["hook_pos_embed"])
                labels.append("pos_embed")
        for l in range(layer):
            if mode != "mlp":
                comps.append(self[("attn_out", l)])
                labels.append(f"{l}_attn_out")
            if mode != "attn":
                comps.append(self[("mlp_out", l)])
                labels.append(f"{l}_mlp_out")
        if mlp_input and mode != "mlp" and layer < self._n_layers() and not self._parallel():
            comps.append(self[("attn_out", layer)])
            labels.append(f"{layer}_attn_out")
        if not comps:
            raise ValueError("decompose_resid: no components selected (layer 0 without embeddings).")
        stack = mx.stack([self._pos(c, pos_slice) for c in comps])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Fill ``blocks.{l}.attn.hook_result`` [..., P, H, d_model] = z_h @ W_O[h] (before b_O) from the
        cached ``hook_z``, for every layer whose z is cached."""
        model = self._require_model("compute_head_results")
        for l, block in enumerate(model.blocks):
            name = f"blocks.{l}.attn.hook_z"
            if name not in self.cache_dict:
                raise KeyError(f"compute_head_results needs {name!r} in the cache.")
            z = self.cache_dict[name]
            w_o = block.attn.W_O.astype(z.dtype)  # [H, d_head, d_model]
            self.cache_dict[f"blocks.{l}.attn.hook_result"] = mx.einsum("...hd,hdm->...hm", z, w_o)

    def _post_norm_linear(self, layer: int, which: str, x: mx.array, pos_slice) -> mx.array:
        """The part of a post-sublayer norm (``ln1_post`` / ``ln2_post``, Gemma-2/3) that is linear given its
        cached scale: centre (LayerNorm), divide by the cached scale, multiply by the weight. Identity for
        blocks without that norm. x: [n, ..., d_model] contributions to the sublayer output."""
        block = self.model.blocks[layer]
        if which not in block:
            return x
        norm = block[which]
        if norm.kind == "ln":
            x = x - x.mean(axis=-1, keepdims=True)
        scale = self._pos(self[f"blocks.{layer}.{which}.hook_scale"], pos_slice)
        return x / scale * norm.effective_weight().astype(x.dtype)

    def _with_remainder(self, stack, labels, layer, pos_slice, mlp_input=False):
        resid = self._pos(self._resid_at(layer, mlp_input), pos_slice)
        rem = resid - (stack.sum(axis=0) if stack.shape[0] else 0)
        return mx.concatenate([stack, rem[None].astype(stack.dtype)]), labels + ["remainder"]

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False) -> ResidStack | tuple[ResidStack, list[str]]:
        """Every head's direct write to the residual stream for layers < ``layer``: [L*H, ..., d_model],
        labels ``L{l}H{h}``. Head results are computed from ``hook_z`` when not cached; in post-norm models
        (Gemma-2/3) they pass the linear part of ``ln1_post`` (cached scale, weight), so they are what each
        head adds to the residual. ``incl_remainder`` appends ``remainder`` = residual - sum(heads);
        ``apply_ln`` normalises for the norm reading ``layer``."""
        model = self._require_model("stack_head_results")
        layer = self._layer_arg(layer, "stack_head_results")
        H = model.cfg.n_heads
        if layer > 0 and f"blocks.{layer - 1}.attn.hook_result" not in self.cache_dict:
            self.compute_head_results()
        comps, labels = [], []
        for l in range(layer):
            r = self._pos(self[("result", l)], pos_slice, dim=-3)  # [..., (P), H, dm]
            r = mx.moveaxis(r, -2, 0)  # [H, ..., dm]
            comps.append(self._post_norm_linear(l, "ln1_post", r, pos_slice))
            labels += [f"L{l}H{h}" for h in range(H)]
        return self._finish_component_stack(comps, labels, layer, pos_slice, incl_remainder, apply_ln,
                                            return_labels)

    def _finish_component_stack(self, comps, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels):
        """The shared end of the per-head and per-neuron stacks: concatenate, remainder, final LN, labels."""
        stack = mx.concatenate(comps) if comps else self._empty_stack(pos_slice)
        if incl_remainder:
            stack, labels = self._with_remainder(stack, labels, layer, pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _empty_stack(self, pos_slice) -> mx.array:
        ref = self._pos(self[("resid_pre", 0)], pos_slice)
        return mx.zeros((0,) + tuple(ref.shape), dtype=ref.dtype)

    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None) -> mx.array:
        """Each neuron's write to the MLP output: post[..., n] * W_out[n] -> [..., P, n_neurons, d_model]
        (before b_out and before any post-MLP norm)."""
        model = self._require_model("get_neuron_results")
        from .components import linear_weight

        down = model._mlp_linear(model.blocks[layer], "down_proj", "get_neuron_results")
        w_out = linear_weight(down).T  # [dmlp, dm]
        post = self._pos(self[("post", layer)], pos_slice)  # [..., (P), dmlp]
        if neuron_slice is not None:
            if isinstance(neuron_slice, (list, tuple)):
                neuron_slice = mx.array(neuron_slice)
            if isinstance(neuron_slice, int):
                neuron_slice = slice(neuron_slice, neuron_slice + 1 if neuron_slice != -1 else None)
            post, w_out = post[..., neuron_slice], w_out[neuron_slice]
        return post[..., None] * w_out.astype(post.dtype)

    def stack_neuron_results(self, layer: int, pos_slice=None, neuron_slice=None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False
                             ) -> ResidStack | tuple[ResidStack, list[str]]:
        """Every neuron's direct write to the residual stream for layers < ``layer``: [L*d_mlp, ..., d_model],
        labels ``L{l}N{n}`` (through ``ln2_post``'s linear part in post-norm models). Gated and plain MLPs;
        mixture-of-experts blocks have no single W_out and raise."""
        model = self._require_model("stack_neuron_results")
        layer = self._layer_arg(layer, "stack_neuron_results")
        idx = list(range(model.cfg.d_mlp))
        if neuron_slice is not None:
            sel = neuron_slice
            if isinstance(sel, int):
                sel = [idx[sel]]
            elif isinstance(sel, slice):
                sel = idx[sel]
            elif isinstance(sel, mx.array):
                sel = sel.tolist()
            idx = [int(i) for i in sel]
        comps, labels = [], []
        for l in range(layer):
            r = mx.moveaxis(self.get_neuron_results(l, neuron_slice, pos_slice), -2, 0)  # [n, ..., dm]
            comps.append(self._post_norm_linear(l, "ln2_post", r, pos_slice))
            labels += [f"L{l}N{i}" for i in idx]
        return self._finish_component_stack(comps, labels, layer, pos_slice, incl_remainder, apply_ln,
                                            return_labels)

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None) -> mx.array:
        """One hook stacked over layers 0..layer-1 (all for -1): [layer, ...]. ``activation_name`` is a TL
        short name ("resid_pre", "pattern", "scale" with sublayer_type "ln1", ...)."""
        layer = self._layer_arg(layer, "stack_activation")
        return mx.stack([self[(activation_name, l, sublayer_type)] if sublayer_type is not None
                         else self[(activation_name, l)] for l in range(layer)])

    def _accumulated_bias(self, layer: int, mlp_input: bool, include_mlp_biases: bool, shape, pos_slice):
        """Sum of the bias writes (b_O, b_out, post-norm biases) for layers < layer, as [1, *shape]."""
        model = self.model
        from .weights_view import _bias

        total = mx.zeros(shape, dtype=mx.float32)
        dm = model.cfg.d_model
        n_attn = layer + (1 if mlp_input and layer < model.cfg.n_layers and not self._parallel() else 0)
        for l in range(n_attn):
            block = model.blocks[l]
            b = _bias(block.attn.o_proj, dm, mx.float32)[None]
            total = total + self._post_norm_linear(l, "ln1_post", b, pos_slice)[0]
            if "ln1_post" in block and "bias" in block.ln1_post:
                total = total + block.ln1_post.bias
        if include_mlp_biases:
            for l in range(layer):
                block = model.blocks[l]
                down = model._mlp_linear(block, "down_proj", "the bias term")
                b = _bias(down, dm, mx.float32)[None]
                total = total + self._post_norm_linear(l, "ln2_post", b, pos_slice)[0]
                if "ln2_post" in block and "bias" in block.ln2_post:
                    total = total + block.ln2_post.bias
        return total[None]

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                     return_labels: bool = False) -> ResidStack | tuple[ResidStack, list[str]]:
        """The residual at ``layer`` as heads + neurons (or whole MLPs) + embeddings + biases.

        Components: ``L{l}H{h}`` for every head before ``layer`` (and of ``layer`` itself with
        ``mlp_input``), ``L{l}N{n}`` for every neuron (or ``{l}_mlp_out`` with ``expand_neurons=False``),
        ``embed``, ``pos_embed``, and ``bias`` (all b_O / b_out / post-norm bias writes). They sum to the
        residual stream that ``layer`` reads (within float error)."""
        model = self._require_model("get_full_resid_decomposition")
        layer = self._layer_arg(layer, "get_full_resid_decomposition")
        extra = 1 if mlp_input and layer < model.cfg.n_layers and not self._parallel() else 0
        Labelled = tuple[ResidStack, list[str]]  # what return_labels=True gives
        heads, labels = cast(Labelled, self.stack_head_results(layer + extra, pos_slice=pos_slice, return_labels=True))
        comps = [heads]
        if layer > 0:
            if expand_neurons:
                st, lb = cast(Labelled, self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True))
            else:
                st, lb = cast(Labelled, self.decompose_resid(layer, mode="mlp", incl_embeds=False,
                                                             pos_slice=pos_slice, return_labels=True))
            comps.append(st)
            labels = labels + lb
        for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if name in self.cache_dict:
                comps.append(self._pos(self[name], pos_slice)[None])
                labels.append(label)
        shape = tuple(self._pos(self[("resid_pre", 0)], pos_slice).shape)
        bias = self._accumulated_bias(layer, mlp_input, expand_neurons, shape, pos_slice)
        dtype = heads.dtype
        comps.append(bias.astype(dtype))
        labels.append("bias")
        stack = mx.concatenate([c.astype(dtype) for c in comps])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def logit_attrs(self, residual_stack: ResidStack, tokens, incorrect_tokens=None, pos_slice=None,
                    batch_slice=None, has_batch_dim: bool = True) -> ComponentAttrs:
        """Each component's direct contribution to the logit of ``tokens`` (minus ``incorrect_tokens``).

        residual_stack: [n, ..., d_model] from the methods above, *without* apply_ln (the final norm's
        cached scale is applied here). tokens: a str / int, [batch] (one per row, with a pos-sliced stack)
        or [batch, pos]. Returns [n, ...]: LN(component) . (w_ln * (W_U[:, tok] - W_U[:, incorrect])).
        w_ln is the final norm's weight (1 after fold_ln, as TL assumes), so for the full decomposition the
        attributions sum to the pre-soft-cap logit (``unembed.hook_out``) minus the terms from the final
        norm's bias and b_U (zero for RMSNorm models without an unembedding bias).
        """
        model = self._require_model("logit_attrs")
        if isinstance(tokens, str):
            tokens = model.to_single_token(tokens)
        if isinstance(incorrect_tokens, str):
            incorrect_tokens = model.to_single_token(incorrect_tokens)
        tokens = mx.array(tokens)
        if tokens.ndim == 2 and pos_slice is not None:
            tokens = self._pos(tokens, pos_slice, dim=-1)
        dirs = model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            inc = mx.array(incorrect_tokens)
            if inc.ndim == 2 and pos_slice is not None:
                inc = self._pos(inc, pos_slice, dim=-1)
            if inc.shape != tokens.shape:
                raise ValueError(f"tokens {tuple(tokens.shape)} and incorrect_tokens {tuple(inc.shape)} must "
                                 f"have the same shape.")
            dirs = dirs - model.tokens_to_residual_directions(inc)
        dirs = dirs * model.ln_final.effective_weight().astype(dirs.dtype)
        scaled = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        return (scaled * dirs.astype(scaled.dtype)).sum(axis=-1)


def _flat(name: str, act) -> bool:
    """Whether a cached activation has batch and positions flattened together ([B*P, ...]: no batch axis
    of its own to remove)."""
    try:
        return hook_spec(name, act.ndim).flat_batch_pos
    except ValueError:  # a custom module's hook: [batch, ...]
        return False
