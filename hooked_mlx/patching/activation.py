"""Activation patching with TransformerLens's functions and output shapes, batched.

Every function takes ``(model, corrupted_tokens, clean_cache, patching_metric)`` like TransformerLens and
returns a float32 ``mx.array`` with TL's shape. ``clean_cache`` is an ``ActivationCache`` (or dict) of the
clean run, or the clean input itself (text / token ids: the needed hooks are then cached here).

Keyword options (all functions):

* ``align``: None (default, strict: equal lengths), ``"end"`` or ``"start"`` (see ``patching.align``);
* ``clean_tokens``: the clean token ids, only to show them in length errors when a cache is given;
* ``memory_budget_mb``: memory for one batched chunk (default ``engine.MEMORY_BUDGET_MB``);
* ``reuse_kv`` (True): compute positions >= the patched one only, reusing the corrupted keys/values;
* ``bucket``: pad batch sizes to powers of two (default: on GPUs);
* ``blas_threads``: BLAS threads while the sweep runs ("auto": 1 for small models on CPU, else unchanged;
  see ``engine.blas_threads``; None leaves the setting alone);
* ``skip_identical`` (True): a cell whose clean and corrupted activations are bitwise equal at its index
  (e.g. every position before the first differing token) is the identity patch; it gets the corrupted
  run's metric without running;
* ``batched`` (True): False runs TL's one-forward-per-cell loop (a slow reference).

Under GQA, k/v patches range over the key/value heads (Hkv); ``*_every`` functions zero-pad them to H.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ..names import hook_spec
from ..shapes import PatchResult
from .align import align_positions, check_align, require_lengths
from .engine import Cell, CorruptedRun, PatchEngine, _scalar, hook_info, run_cells_loop

_AXIS_NAMES = ("layer", "pos", "head_index", "head", "src_pos", "dest_pos", "neuron")


def as_tokens(model, x) -> mx.array:
    if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and isinstance(x[0], str)):
        return model.to_tokens(x)
    t = x if isinstance(x, mx.array) else mx.array(x)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or not mx.issubdtype(t.dtype, mx.integer):
        raise ValueError(f"Expected token ids [batch, pos] or text; got shape {tuple(t.shape)}, dtype {t.dtype}.")
    return t.astype(mx.int32)


def clean_activations(model, clean, names: Sequence[str]) -> tuple[dict[str, mx.array], Any]:
    """{name: clean activation} from a cache, a dict, or a clean input (run here). Returns (acts, tokens)."""
    from ..cache import ActivationCache

    if isinstance(clean, (ActivationCache, dict)):
        acts = {}
        for n in names:
            if n not in clean:
                raise KeyError(
                    f"The clean cache has no {n!r}. Cache it (run_with_cache with a names_filter that includes "
                    f"it), or pass the clean tokens instead of a cache and the needed hooks are cached here."
                )
            acts[n] = clean[n]
        if isinstance(clean, ActivationCache) and not clean.has_batch_dim:
            acts = {n: a[None] for n, a in acts.items()}
        return acts, None
    toks = as_tokens(model, clean)
    _, cache = model.run_with_cache(toks, names_filter=list(names))
    return {n: cache[n] for n in names}, toks


class _Setup:
    """Shared preparation: tokens, clean activations aligned to corrupted positions, the engine."""

    def __init__(self, model, corrupted_tokens, clean_cache, metric, names, whole_sequence_names=(),
                 align=None, clean_tokens=None, memory_budget_mb=None, reuse_kv=True, bucket=None,
                 blas_threads="auto", skip_identical=True):
        check_align(align)
        self.model = model
        self.tokens = as_tokens(model, corrupted_tokens)
        B, P = self.tokens.shape
        names = [model.resolve_hook_names(n)[0] for n in names]
        acts, toks = clean_activations(model, clean_cache, names)
        clean_tokens = toks if clean_tokens is None else clean_tokens
        self.pmap = None
        self.clean = {}
        for n in names:
            info = hook_info(model, n)
            a = acts[n]
            if a.shape[0] not in (1, B):
                raise ValueError(f"The clean {n!r} has batch {a.shape[0]}; the corrupted tokens have batch {B}.")
            a = mx.broadcast_to(a, (B,) + a.shape[1:])
            Pc = a.shape[info.pos_axis + 1]
            whole = n in whole_sequence_names or info.src_axis is not None
            pmap = require_lengths(model, Pc, P, align, clean_tokens, self.tokens, what=f"patch {n}",
                                   whole_sequence=whole)
            self.pmap = pmap
            if Pc != P or align == "end":
                a = align_positions(a, P, info.pos_axis + 1, pmap)
            self.clean[n] = a
        self.corr = CorruptedRun(model, self.tokens, need_embed=any(n in ("hook_embed", "hook_pos_embed")
                                                                      for n in names),
                                 patched=names if skip_identical else ())
        self.skip_identical = skip_identical
        self.engine = PatchEngine(model, self.corr, self.clean, metric, memory_budget_mb, reuse_kv, bucket,
                                  blas_threads)
        self.metric = metric

    def valid(self, cell: Cell) -> bool:
        """False when the cell's position has no clean counterpart (unequal lengths with align)."""
        if self.pmap is None:
            return True
        info = hook_info(self.model, cell.name)
        p = cell.index[info.pos_axis] if info.pos_axis is not None else None
        return p is None or self.pmap[p] >= 0

    def run(self, cells: list[Cell], batched: bool = True) -> mx.array:
        ok = [self.valid(c) for c in cells]
        todo = [c for c, v in zip(cells, ok) if v]
        if batched:
            vals = self.engine.run(todo, skip_identical=self.skip_identical)
        else:
            vals = run_cells_loop(self.model, self.tokens, self.clean, todo, self.metric)
        out = np.full(len(cells), np.nan, dtype=np.float32)
        out[np.array(ok, dtype=bool)] = np.array(vals, dtype=np.float32)
        return mx.array(out)


def _opts(kw: dict) -> tuple[dict, bool]:
    known = {"align", "clean_tokens", "memory_budget_mb", "reuse_kv", "bucket", "blas_threads", "skip_identical"}
    bad = set(kw) - known - {"batched"}
    if bad:
        raise TypeError(f"Unknown option(s) {sorted(bad)}; valid: {sorted(known | {'batched'})}.")
    return {k: v for k, v in kw.items() if k in known}, kw.get("batched", True)


def _grid(model, corrupted_tokens, clean_cache, metric, hook: str, shape_fn, kw, whole_sequence=False):
    """Patch ``hook`` (a per-layer shorthand like "resid_pre") over a grid. shape_fn(setup) -> (dims, cell_fn)
    where cell_fn(layer, *idx) -> index tuple."""
    opts, batched = _opts(kw)
    L = model.cfg.n_layers
    names = [f"blocks.{l}.{hook}" for l in range(L)]
    setup = _Setup(model, corrupted_tokens, clean_cache, metric, names,
                   whole_sequence_names=names if whole_sequence else (), **opts)
    dims, cell_fn = shape_fn(setup)
    cells = [Cell(names[l], cell_fn(*idx)) for l in range(L) for idx in itertools.product(*[range(d) for d in dims])]
    vals = setup.run(cells, batched)
    return vals.reshape((L,) + tuple(dims))


def _heads(model, hook: str) -> int:
    """Heads on the hook's head axis: n_kv_heads for keys and values (GQA), else n_heads."""
    return model.cfg.n_key_value_heads if "kv_head" in hook_spec(hook).axes else model.cfg.n_heads


# -- [L, P] ------------------------------------------------------------------------------------------
def _by_pos(hook):
    def f(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
        def shape(s):
            nd = s.clean[f"blocks.0.{hook}"].ndim - 2
            return (s.tokens.shape[1],), (lambda p: (p,) + (None,) * nd)

        return _grid(model, corrupted_tokens, clean_cache, patching_metric, hook, shape, kw)

    f.__name__ = "get_act_patch_" + hook.split("hook_")[-1]
    f.__doc__ = f"Patch ``blocks.{{l}}.{hook}`` at each (layer, position): float32 [n_layers, pos]."
    return f


get_act_patch_resid_pre = _by_pos("hook_resid_pre")
get_act_patch_resid_mid = _by_pos("hook_resid_mid")
get_act_patch_attn_out = _by_pos("hook_attn_out")
get_act_patch_mlp_out = _by_pos("hook_mlp_out")
get_act_patch_resid_post = _by_pos("hook_resid_post")


# -- heads -------------------------------------------------------------------------------------------
def _head_by_pos(hook):
    def f(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
        def shape(s):
            return (s.tokens.shape[1], _heads(model, hook)), (lambda p, h: (p, h, None))

        return _grid(model, corrupted_tokens, clean_cache, patching_metric, hook, shape, kw)

    f.__doc__ = (f"Patch each head of ``blocks.{{l}}.{hook}`` at each position: float32 [n_layers, pos, heads] "
                 f"(key/value heads for k and v under GQA).")
    return f


def _head_all_pos(hook):
    def f(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
        def shape(s):
            return (_heads(model, hook),), (lambda h: (None, h, None))

        return _grid(model, corrupted_tokens, clean_cache, patching_metric, hook, shape, kw, whole_sequence=True)

    f.__doc__ = (f"Patch each head of ``blocks.{{l}}.{hook}`` at every position: float32 [n_layers, heads] "
                 f"(key/value heads for k and v under GQA). Needs equal lengths.")
    return f


get_act_patch_attn_head_out_by_pos = _head_by_pos("attn.hook_z")
get_act_patch_attn_head_q_by_pos = _head_by_pos("attn.hook_q")
get_act_patch_attn_head_k_by_pos = _head_by_pos("attn.hook_k")
get_act_patch_attn_head_v_by_pos = _head_by_pos("attn.hook_v")
get_act_patch_attn_head_out_all_pos = _head_all_pos("attn.hook_z")
get_act_patch_attn_head_q_all_pos = _head_all_pos("attn.hook_q")
get_act_patch_attn_head_k_all_pos = _head_all_pos("attn.hook_k")
get_act_patch_attn_head_v_all_pos = _head_all_pos("attn.hook_v")


def get_act_patch_attn_head_pattern_all_pos(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
    """Patch each head's whole attention pattern: float32 [n_layers, heads]."""
    def shape(s):
        return (model.cfg.n_heads,), (lambda h: (h, None, None))

    return _grid(model, corrupted_tokens, clean_cache, patching_metric, "attn.hook_pattern", shape, kw)


def get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
    """Patch each head's pattern row at each destination position: float32 [n_layers, heads, dest_pos]."""
    def shape(s):
        return (model.cfg.n_heads, s.tokens.shape[1]), (lambda h, d: (h, d, None))

    return _grid(model, corrupted_tokens, clean_cache, patching_metric, "attn.hook_pattern", shape, kw)


def get_act_patch_attn_head_pattern_dest_src_pos(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
    """Patch single pattern entries: float32 [n_layers, heads, dest_pos, src_pos]."""
    def shape(s):
        P = s.tokens.shape[1]
        return (model.cfg.n_heads, P, P), (lambda h, d, src: (h, d, src))

    return _grid(model, corrupted_tokens, clean_cache, patching_metric, "attn.hook_pattern", shape, kw)


def _pad_heads(x: mx.array, H: int, axis: int) -> mx.array:
    if x.shape[axis] == H:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, H - x.shape[axis])
    return mx.pad(x, pad)


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
    """[5, n_layers, heads]: head output (z), q, k, v, pattern, all positions (k/v zero-padded to H)."""
    H = model.cfg.n_heads
    parts = [get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos,
             get_act_patch_attn_head_k_all_pos, get_act_patch_attn_head_v_all_pos,
             get_act_patch_attn_head_pattern_all_pos]
    return mx.stack([_pad_heads(f(model, corrupted_tokens, clean_cache, patching_metric, **kw), H, 1) for f in parts])


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
    """[5, n_layers, pos, heads]: z, q, k, v by position, and pattern by destination (k/v zero-padded)."""
    H = model.cfg.n_heads
    parts = [get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos,
             get_act_patch_attn_head_k_by_pos, get_act_patch_attn_head_v_by_pos]
    out = [_pad_heads(f(model, corrupted_tokens, clean_cache, patching_metric, **kw), H, 2) for f in parts]
    pat = get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, patching_metric, **kw)
    out.append(pat.transpose(0, 2, 1))
    return mx.stack(out)


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
    """[3, n_layers, pos]: resid_pre, attn_out, mlp_out, each patched per (layer, position) -- in one sweep."""
    L = model.cfg.n_layers
    kinds = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")
    names = [f"blocks.{l}.{k}" for k in kinds for l in range(L)]
    opts, batched = _opts(kw)
    setup = _Setup(model, corrupted_tokens, clean_cache, patching_metric, names, **opts)
    P = setup.tokens.shape[1]
    cells = [Cell(f"blocks.{l}.{k}", (p, None)) for k in kinds for l in range(L) for p in range(P)]
    return setup.run(cells, batched).reshape(3, L, P)


# -- generic -----------------------------------------------------------------------------------------
def generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, activation_name: str,
                             index_axis_names: Sequence[str] | None = None, index_df=None,
                             return_index_df: bool = False, patch_setter=None, **kw) -> PatchResult | tuple[PatchResult, Any]:
    """Patch any hook over an index set, batched.

    activation_name: a per-layer shorthand (``"resid_pre"``, ``"z"``, ``"pattern"``, ``"post"``...) or a
    full hook name (then there is no layer axis). index_axis_names: TL's axis names, a subset of
    ``layer, pos, head_index (= head), dest_pos, src_pos, neuron``: the grid is their full product and the
    result has one axis each, in the given order. index_df: instead, an explicit list of index rows (a
    pandas DataFrame whose columns are axis names, or a list of dicts); the result is then 1-D.
    patch_setter: TL's ``setter(corrupted_act, index, clean_act) -> act`` for custom patches; runs one
    forward per cell (not batched).
    """
    from ..names import get_act_name

    opts, batched = _opts(kw)
    L = model.cfg.n_layers
    per_layer = "." not in activation_name and not activation_name.startswith("hook_")
    names = ([get_act_name(activation_name, l) for l in range(L)] if per_layer
             else [model.resolve_hook_names(activation_name)[0]])
    if index_df is None and index_axis_names is None:
        raise ValueError("Pass index_axis_names=[...] (a full grid) or index_df=... (explicit rows).")
    whole = index_axis_names is not None and "pos" not in index_axis_names and "dest_pos" not in index_axis_names
    setup = _Setup(model, corrupted_tokens, clean_cache, patching_metric, names,
                   whole_sequence_names=names if whole else (), **opts)
    B, P = setup.tokens.shape
    info0 = hook_info(model, names[0])
    act_dims = setup.clean[names[0]].shape[1:]

    def axis_of(ax: str) -> int:
        if ax in ("head_index", "head"):
            return 1 if info0.src_axis is None else 0
        if ax in ("pos", "dest_pos"):
            if info0.pos_axis is None:
                raise ValueError(f"{ax} does not apply to {names[0]!r}: it has no position axis.")
            return info0.pos_axis
        if ax == "src_pos":
            if info0.src_axis is None:
                raise ValueError(f"src_pos only applies to attention patterns/scores, not {names[0]!r}.")
            return info0.src_axis
        if ax == "neuron":
            return len(act_dims) - 1
        raise ValueError(f"Unknown index axis {ax!r}; valid: {_AXIS_NAMES}.")

    if index_df is not None:
        rows = index_df.to_dict("records") if hasattr(index_df, "to_dict") else list(index_df)
    else:
        assert index_axis_names is not None  # checked above
        for ax in index_axis_names:
            if ax not in _AXIS_NAMES:
                raise ValueError(f"Unknown index axis {ax!r}; valid: {_AXIS_NAMES}.")
        sizes = []
        for ax in index_axis_names:
            sizes.append(L if ax == "layer" else act_dims[axis_of(ax)])
        rows = [dict(zip(index_axis_names, combo)) for combo in itertools.product(*[range(s) for s in sizes])]

    cells = []
    for r in rows:
        if per_layer and "layer" not in r:
            raise ValueError("A per-layer activation name needs a 'layer' index axis.")
        name = names[int(r["layer"])] if per_layer else names[0]
        index: list[int | None] = [None] * len(act_dims)
        for ax, v in r.items():
            if ax != "layer":
                index[axis_of(ax)] = int(v)
        cells.append(Cell(name, tuple(index)))
    if patch_setter is not None:
        vals = _run_setter(setup, cells, rows, patch_setter)
    else:
        vals = setup.run(cells, batched)
    if index_df is None:
        vals = vals.reshape(tuple(sizes))
    if return_index_df:
        return vals, rows
    return vals


def _run_setter(setup: _Setup, cells, rows, setter) -> mx.array:
    out = []
    for c, r in zip(cells, rows):
        clean = setup.clean[c.name]
        idx = [r[k] for k in r if k != "layer"]

        def hook(act, hook, clean=clean, idx=idx):
            return setter(act, idx, clean).astype(act.dtype)

        logits = setup.model.run_with_hooks(setup.tokens, fwd_hooks=[(c.name, hook)])
        v = _scalar(setup.metric(logits), setup.metric)
        mx.eval(v)
        out.append(v)
    return mx.stack(out).astype(mx.float32)
