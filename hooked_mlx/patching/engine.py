"""The batched patching engine: many patch cells per forward pass.

A *cell* patches one hook at one index set (``Cell(name, index)``; ``index`` has one entry per non-batch
axis of the activation: an int or None = every entry of that axis). For each cell the corrupted input is
repeated (one row block of B prompts per cell) and the hook replaces the indexed entries of that row block
with the clean activation. Three things keep a sweep cheap, none of them approximate:

* **start at the patched layer**: a patch in layer l leaves layers < l unchanged, so a cell's rows join
  the batch at layer l from the corrupted run's cached ``resid_pre`` (the batch grows layer by layer);
* **reuse the corrupted keys/values** (``reuse_kv``): a patch at position p leaves positions < p unchanged in
  every layer (causal attention), so a chunk whose earliest patched position is p0 computes positions
  >= p0 only, reading the corrupted run's post-rotary keys and values for positions < p0;
* **unembed only what the metric reads**: a ``Metric`` declares its positions; only those are unembedded.

Cells are grouped into chunks by a cost model (per-layer dispatch overhead against recomputed FLOPs) under
a memory budget; with ``bucket=True`` (the default on GPUs) the number of rows is padded to a power of two
so that the set of shapes stays small (MLX's CUDA graph cache raises after many misses).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import numpy as np

from ..names import hook_spec
from .metrics import Metric

#: default memory budget of one chunk, in MiB (override per call with memory_budget_mb=)
MEMORY_BUDGET_MB = 1024


@dataclass(frozen=True)
class Cell:
    """Patch hook ``name`` at ``index`` (one int or None per non-batch axis of the activation)."""

    name: str
    index: tuple


@dataclass(frozen=True)
class HookInfo:
    name: str
    layer: int  # -1 for the embedding hooks
    pos_axis: int | None  # non-batch axis of (query) positions
    src_axis: int | None  # pattern/scores key axis


def hook_info(model, name: str) -> HookInfo:
    full = model.resolve_hook_names(name)[0]
    spec = hook_spec(full)
    if spec.layer is not None or full in ("hook_embed", "hook_pos_embed"):
        if spec.pos_axis is None:
            raise ValueError(f"{full!r} (axes {spec.axes}) has no position axis of its own and cannot be patched.")
        # non-batch axes: the (query) position, and the pattern's key position
        src = spec.key_pos_axis
        return HookInfo(full, spec.layer if spec.layer is not None else -1, spec.pos_axis - 1,
                        None if src is None else src - 1)
    raise ValueError(
        f"Patching {full!r} is not supported: the engine patches block hooks and the embedding hooks. "
        f"To patch the final residual, patch blocks.{model.cfg.n_layers - 1}.hook_resid_post."
    )


def p_start(info: HookInfo, index: tuple) -> int:
    """First position a cell can change (causal attention)."""
    if info.pos_axis is None:
        return 0
    p = index[info.pos_axis]
    return 0 if p is None else int(p)


# ------------------------------------------------------------------------------------------------
# the corrupted run's state, computed once
# ------------------------------------------------------------------------------------------------
class CorruptedRun:
    """Token ids [B,P] and the corrupted run's residuals, post-rotary keys, values and logits."""

    def __init__(self, model, tokens: mx.array, need_embed: bool = False, patched: Sequence[str] = ()):
        self.model, self.tokens = model, tokens
        L = model.cfg.n_layers
        names = ([f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{l}.attn.hook_rot_k" for l in range(L)]
                 + [f"blocks.{l}.attn.hook_v" for l in range(L)])
        if need_embed:
            names += [n for n in ("hook_embed", "hook_pos_embed") if n in model.hook_dict]
        names += [n for n in patched if n not in names]
        logits, cache = model.run_with_cache(tokens, names_filter=names)
        self.acts = {n: cache[n] for n in patched}  # the patched hooks' corrupted activations
        self.logits = logits  # [B,P,V]
        self.resid = [cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)]  # [B,P,dm]
        self.k = [cache[f"blocks.{l}.attn.hook_rot_k"].transpose(0, 2, 1, 3) for l in range(L)]  # [B,Hkv,P,dh]
        self.v = [cache[f"blocks.{l}.attn.hook_v"].transpose(0, 2, 1, 3) for l in range(L)]
        self.embed = {n: cache[n] for n in ("hook_embed", "hook_pos_embed") if n in cache}
        mx.eval(self.k, self.v)


class _PrefixKV:
    """A KV 'cache' holding the corrupted run's keys/values for positions < offset (shared by every row)."""

    def __init__(self, k: mx.array, v: mx.array, offset: int):
        self.k, self.v, self.offset = k, v, offset  # [B,Hkv,p0,dh]

    def update_and_fetch(self, k: mx.array, v: mx.array):
        R, B = k.shape[0], self.k.shape[0]
        pk = mx.broadcast_to(self.k[None], (R // B,) + self.k.shape).reshape((R,) + self.k.shape[1:])
        pv = mx.broadcast_to(self.v[None], (R // B,) + self.v.shape).reshape((R,) + self.v.shape[1:])
        return mx.concatenate([pk.astype(k.dtype), k], axis=2), mx.concatenate([pv.astype(v.dtype), v], axis=2)


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Temporarily set the loaded BLAS's thread count (MKL or OpenBLAS; no-op otherwise or for None).

    Batched patching runs attention as many tiny per-head GEMMs; for a small model a threaded MKL spent
    ~100x their cost in thread hand-off on a 2-core CPU, so sweeps of small models on CPU default to 1 BLAS
    thread (``blas_threads="auto"``)."""
    from .. import _blas

    lib = getattr(_blas, "LOADED", None)
    if n is None or lib is None:
        yield
        return
    get: Any
    put: Any
    try:
        dll = ctypes.CDLL(lib)
        if hasattr(dll, "MKL_Set_Num_Threads"):
            get, put = dll.MKL_Get_Max_Threads, dll.MKL_Set_Num_Threads
        elif hasattr(dll, "openblas_set_num_threads"):
            get, put = dll.openblas_get_num_threads, dll.openblas_set_num_threads
        else:
            get = put = None
    except OSError:
        get = put = None
    if put is None:
        yield
        return
    prev = get()
    put(int(n))
    try:
        yield
    finally:
        put(prev)


class _CaptureKV:
    """Records the full keys/values (prefix + new) an attention call produces."""

    def __init__(self, prefix: _PrefixKV | None, offset: int):
        self.prefix, self.offset = prefix, offset
        self.k: mx.array = mx.zeros((0,))  # set by the attention call
        self.v: mx.array = mx.zeros((0,))

    def update_and_fetch(self, k, v):
        if self.prefix is not None:
            k, v = self.prefix.update_and_fetch(k, v)
        self.k, self.v = k, v
        return k, v


class _FixedKV:
    """Hands attention precomputed keys/values (its own new ones are among them)."""

    def __init__(self, k, v, offset: int):
        self.k, self.v, self.offset = k, v, offset

    def update_and_fetch(self, k, v):
        return self.k, self.v


def final_logits(model, x: mx.array) -> mx.array:
    """ln_final + unembed (+ final soft-cap) of a residual [..., dm]."""
    logits = model.unembed(model.ln_final(x), model.embed)
    cap = model.cfg.final_softcap
    if cap:
        logits = mx.tanh(logits / cap) * cap
    return logits


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------
def _flops_per_token_layer(cfg, P: int) -> float:
    dm, H, Hkv, dh, dmlp = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp
    return 2.0 * (dm * (H + 2 * Hkv) * dh + H * dh * dm + (3 if cfg.gated_mlp else 2) * dm * dmlp) + 4.0 * P * H * dh


def _bytes_per_cell(cfg, B: int, P: int, n_pos: int, manual_attn: bool) -> int:
    dm, H, Hkv, dh, dmlp = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp
    per_tok = 4 * (8 * dm + 4 * dmlp + 3 * (H + 2 * Hkv) * dh + (3 * H * P if manual_attn else 0))
    return B * (P * per_tok + 3 * 4 * n_pos * cfg.d_vocab)


def plan_chunks(items: list[tuple[int, int]], n_layers: int, P: int, cfg, max_cells: int, reuse_kv: bool,
                overhead_flops: float = 3e7) -> list[list[int]]:
    """Split cells (given as (layer, p_start)) into chunks (lists of indices) minimising estimated cost."""
    n = len(items)
    if n == 0:
        return []
    if reuse_kv:
        order = sorted(range(n), key=lambda i: (items[i][1], items[i][0]))
    else:
        order = sorted(range(n), key=lambda i: items[i][0])
    ftl = _flops_per_token_layer(cfg, P)
    lay = np.array([max(items[i][0], 0) for i in order])
    ps = np.array([items[i][1] for i in order]) if reuse_kv else np.zeros(n, dtype=int)
    js = np.arange(n_layers)
    best, best_cost = 1, math.inf
    sizes = sorted({min(max_cells, math.ceil(n / k)) for k in range(1, min(n, 256) + 1)})
    for S in sizes:
        cost = 0.0
        for a in range(0, n, S):
            l_sorted = np.sort(lay[a:a + S])
            p0 = ps[a:a + S].min()
            active = np.searchsorted(l_sorted, js, side="right")[l_sorted[0]:]  # cells active at layer j
            cost += len(active) * overhead_flops + active.sum() * (P - p0) * ftl
        if cost < best_cost:
            best, best_cost = S, cost
    return [order[a:a + best] for a in range(0, n, best)]


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
class PatchEngine:
    """Runs lists of cells against one corrupted run.

    clean: {hook name: clean activation [B, ...] already aligned to the corrupted positions}.
    metric: a ``Metric`` (only its positions are unembedded) or a callable logits [B,P,V] -> scalar.
    """

    def __init__(self, model, corrupted: CorruptedRun, clean: dict[str, mx.array], metric,
                 memory_budget_mb: float | None = None, reuse_kv: bool = True, bucket: bool | None = None,
                 blas_threads: int | None | str = "auto"):
        self.model, self.corr, self.clean, self.metric = model, corrupted, clean, metric
        if blas_threads == "auto":
            # small models on CPU: the per-head attention GEMMs are tiny and a threaded BLAS spends far more
            # on thread hand-off than on the work; large models gain from the threads on their big GEMMs
            small = _flops_per_token_layer(model.cfg, 1) < 1e6
            blas_threads = 1 if (mx.default_device() == mx.cpu and small) else None
        elif isinstance(blas_threads, str):
            raise ValueError(f"blas_threads must be an int, None or 'auto'; got {blas_threads!r}.")
        self.blas_threads: int | None = None if isinstance(blas_threads, str) else blas_threads
        self.budget = (memory_budget_mb or MEMORY_BUDGET_MB) * 2 ** 20
        self.reuse_kv = reuse_kv
        self.bucket = (mx.default_device() != mx.cpu) if bucket is None else bucket
        # Running the last block for the metric's query positions only (``_last_layer``) is a CPU-side saving.
        # On MLX's CUDA backend (0.32.4, H100) a chunk of >= 64 rows through it fails to launch a kernel
        # ("cudaGraphAddKernelNode ... invalid argument", also with MLX_USE_CUDA_GRAPHS=0), while the full-width
        # last block runs; on a GPU that layer costs little, so GPUs run it full width.
        self.split_last_layer = mx.default_device() == mx.cpu

    def identical(self, cells: Sequence[Cell]) -> np.ndarray:
        """bool per cell: the clean and corrupted activations are bitwise equal at the cell's index (e.g. every
        position before the first differing token), so the patch is the identity and the cell's value is
        the corrupted run's metric."""
        eq = {}
        out = np.zeros(len(cells), dtype=bool)
        for i, c in enumerate(cells):
            if c.name not in self.corr.acts:
                continue
            if c.name not in eq:
                a, b = self.clean[c.name], self.corr.acts[c.name]
                eq[c.name] = np.array(a == b.astype(a.dtype)) if a.shape == b.shape else None
            e = eq[c.name]
            if e is not None:
                out[i] = bool(np.all(e[(slice(None),) + tuple(slice(None) if x is None else x for x in c.index)]))
        return out

    def base_value(self) -> mx.array:
        """The metric of the corrupted run itself."""
        return _scalar(self.metric(self.corr.logits), self.metric).astype(mx.float32)

    def run(self, cells: Sequence[Cell], skip_identical: bool = True) -> mx.array:
        """Metric value of each cell: float32 [len(cells)]."""
        cells = list(cells)
        if skip_identical and cells:
            same = self.identical(cells)
            if same.any():
                todo = [c for c, s in zip(cells, same) if not s]
                vals = self.run(todo, skip_identical=False) if todo else mx.zeros((0,))
                out = np.full(len(cells), float(self.base_value()), dtype=np.float32)
                out[~same] = np.array(vals)
                return mx.array(out)
        model, cfg = self.model, self.model.cfg
        B, P = self.corr.tokens.shape
        infos = {c.name: hook_info(model, c.name) for c in cells}
        items = [(infos[c.name].layer, p_start(infos[c.name], c.index)) for c in cells]
        n_pos = len(self.metric.positions) if isinstance(self.metric, Metric) else P
        manual = any(c.name.endswith(("hook_pattern", "hook_attn_scores")) for c in cells)
        max_cells = max(1, int(self.budget // _bytes_per_cell(cfg, B, P, n_pos, manual)))
        if self.bucket:
            max_cells = max(1, 1 << (max_cells.bit_length() - 1))
        # cells in the last layer are planned apart, so that the other chunks can run that layer for the
        # metric's positions only (see _run_chunk)
        last = [i for i, (l, _) in enumerate(items) if l == cfg.n_layers - 1]
        rest = [i for i, (l, _) in enumerate(items) if l != cfg.n_layers - 1]
        chunks = []
        for group in (rest, last):
            sub = plan_chunks([items[i] for i in group], cfg.n_layers, P, cfg, max_cells, self.reuse_kv)
            chunks += [[group[k] for k in ch] for ch in sub]
        results: list[mx.array | None] = [None] * len(cells)
        with blas_threads(self.blas_threads):
            self._run_chunks(chunks, cells, items, infos, results)
        return mx.stack(cast(list[mx.array], results)) if results else mx.zeros((0,))

    def _run_chunks(self, chunks, cells, items, infos, out):
        for chunk in chunks:
            chunk = sorted(chunk, key=lambda i: items[i][0])
            vals = self._run_chunk([cells[i] for i in chunk], [items[i] for i in chunk], infos)
            mx.eval(vals)
            for k, i in enumerate(chunk):
                out[i] = vals[k]

    def _run_chunk(self, cells: list[Cell], items: list[tuple[int, int]], infos: dict[str, HookInfo]) -> mx.array:
        model, corr = self.model, self.corr
        B, P = corr.tokens.shape
        L = model.cfg.n_layers
        p0 = min(p for _, p in items) if self.reuse_kv else 0
        if self.bucket:
            p0 -= p0 % 8  # fewer distinct sequence lengths (MLX's CUDA graph cache)
        Pn = P - p0
        layers = [max(l, 0) for l, _ in items]
        n_total = len(cells)

        # one hook per patched name; it patches the row blocks of its cells
        by_name: dict[str, list[tuple[int, tuple]]] = {}
        for k, c in enumerate(cells):
            by_name.setdefault(c.name, []).append((k, c.index))

        def make_hook(name: str):
            info, entries = infos[name], by_name[name]
            clean = self.clean[name]
            if info.pos_axis is not None and p0 > 0:
                clean = clean[(slice(None),) * (info.pos_axis + 1) + (slice(p0, None),)]

            def hook(act, hook_point):
                n_cells = act.shape[0] // B
                dims = act.shape[1:]
                mask = np.zeros((n_cells,) + tuple(dims), dtype=bool)
                for k, index in entries:
                    if k >= n_cells:
                        continue
                    sl = tuple(slice(None) if ix is None else (ix - p0 if a == info.pos_axis else ix)
                               for a, ix in enumerate(index))
                    mask[(k,) + sl] = True
                m = mx.array(mask)[:, None]
                a = act.reshape((n_cells, B) + tuple(dims))
                return mx.where(m, clean.astype(act.dtype)[None], a).reshape(act.shape)

            return hook

        block_hooks = [(name, make_hook(name)) for name in by_name if infos[name].layer >= 0]
        embed_names = [name for name in by_name if infos[name].layer < 0]

        def rows_from(j: int, a: int, b: int) -> mx.array:
            """Corrupted resid_pre[j] at positions >= p0 for cells a..b-1 (with embedding patches)."""
            base = corr.resid[j][:, p0:]
            x = mx.broadcast_to(base[None], (b - a,) + base.shape)
            if j == 0 and embed_names:
                for name in embed_names:
                    delta = (self.clean[name] - corr.embed[name])[:, p0:].astype(x.dtype)  # [B,Pn,dm]
                    mask = np.zeros((b - a, Pn, 1), dtype=bool)
                    for k, index in by_name[name]:
                        if a <= k < b:
                            p = index[0]
                            mask[(k - a, slice(None) if p is None else p - p0)] = True
                    x = x + mx.where(mx.array(mask)[:, None], delta[None], 0.0)
            return x.reshape(((b - a) * B,) + base.shape[1:])

        split_last = None
        if self.split_last_layer and isinstance(self.metric, Metric) and all(l < L - 1 for l in layers):
            from ..components.block import TransformerBlock

            blk = model.blocks[-1]
            qs = self.metric.absolute_positions(P)
            if (min(qs) >= p0 and type(blk)._attn is TransformerBlock._attn
                    and type(blk).__call__ is TransformerBlock.__call__ and not blk.attn.needs_manual):
                split_last = (min(qs), max(qs))

        x, n_real = None, 0
        with model.hooks(block_hooks):
            for j in range(layers[0], L):
                n_new = sum(1 for l in layers if l <= j)
                if n_new > n_real:
                    new = rows_from(j, n_real, n_new)
                    x = new if x is None else mx.concatenate([x[: n_real * B], new], axis=0)
                    n_real = n_new
                    if self.bucket:
                        n_pad = min(_next_pow2(n_real), _next_pow2(n_total)) - n_real
                        if n_pad > 0:
                            x = mx.concatenate([x, mx.broadcast_to(
                                corr.resid[j][:, p0:][None], (n_pad, B, Pn, x.shape[-1])).reshape(
                                (n_pad * B, Pn, x.shape[-1]))], axis=0)
                assert x is not None  # set at layers[0], where the first cell starts
                cache = _PrefixKV(corr.k[j][:, :, :p0], corr.v[j][:, :, :p0], p0) if p0 > 0 else None
                if j == L - 1 and split_last is not None:
                    x = self._last_layer(x, cache, p0, *split_last)
                    p0 = split_last[0]
                else:
                    x = model.blocks[j](x, "causal", cache)
        assert x is not None
        x = x[: n_total * B]
        return self._metric(x, n_total, p0)

    def _last_layer(self, x, cache, p0: int, q0: int, q1: int) -> mx.array:
        """The last block for query positions q0..q1 only (the metric reads nothing else): keys and values of
        every position come from this chunk's residual (MLX is lazy: the discarded full-width attention
        output is never computed)."""
        blk = self.model.blocks[-1]
        kv = _CaptureKV(cache, p0)
        blk.attn(blk.ln1(x) if blk.pre_norms else x, "causal", kv)
        return blk(x[:, q0 - p0:q1 + 1 - p0], "causal", _FixedKV(kv.k[:, :, :q1 + 1], kv.v[:, :, :q1 + 1], q0))

    def _metric(self, x: mx.array, n: int, p0: int) -> mx.array:
        """x: final residual [n*B, P-p0, dm] -> metric per cell [n]."""
        B, P = self.corr.tokens.shape
        corr_logits = self.corr.logits
        if isinstance(self.metric, Metric):
            pos = self.metric.absolute_positions(P)
            parts = []
            for q in pos:
                if q >= p0:
                    parts.append(final_logits(self.model, x[:, q - p0]).astype(mx.float32).reshape(n, B, 1, -1))
                else:
                    parts.append(mx.broadcast_to(corr_logits[None, :, q:q + 1].astype(mx.float32),
                                                 (n, B, 1, corr_logits.shape[-1])))
            sel = mx.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]
            return self.metric.on_selected(sel).astype(mx.float32)
        logits = final_logits(self.model, x).reshape((n, B, P - p0, -1))
        if p0 > 0:
            pre = mx.broadcast_to(corr_logits[None, :, :p0], (n, B, p0, corr_logits.shape[-1]))
            logits = mx.concatenate([pre.astype(logits.dtype), logits], axis=2)
        return mx.stack([_scalar(self.metric(logits[k]), self.metric) for k in range(n)]).astype(mx.float32)


def metric_name(metric) -> str:
    """How an error names a patching metric: its function or class name."""
    return getattr(metric, "__qualname__", None) or type(metric).__name__


def _scalar(v, metric=None) -> mx.array:
    """A metric's value as a 0-d array; anything else raises an error that names the metric."""
    name = metric_name(metric) if metric is not None else "the patching metric"
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        v = mx.array(float(v))
    if not isinstance(v, mx.array):
        raise TypeError(f"The patching metric {name} returned {type(v).__name__} {v!r:.60}; expected an mx.array "
                        f"scalar computed from the logits it is given (e.g. logits[:, -1, tok].mean()).")
    if v.size != 1:
        raise ValueError(f"The patching metric {name} must return a scalar; got shape {tuple(v.shape)}. Reduce "
                         f"over the batch (e.g. .mean()).")
    return v.reshape(())


def run_cells_loop(model, tokens: mx.array, clean: dict[str, mx.array], cells: Sequence[Cell],
                   metric: Callable) -> mx.array:
    """Reference: one full forward per cell with a TransformerLens-style setter hook (slow; for tests)."""
    out = []
    for c in cells:
        value = clean[c.name]

        def setter(act, hook, c=c, value=value):
            idx = (slice(None),) + tuple(slice(None) if i is None else i for i in c.index)
            patched = mx.array(act)
            patched[idx] = value[idx].astype(act.dtype)
            return patched

        logits = model.run_with_hooks(tokens, fwd_hooks=[(c.name, setter)])
        out.append(_scalar(metric(logits), metric))
        mx.eval(out[-1])
    return mx.stack(out).astype(mx.float32) if out else mx.zeros((0,))
