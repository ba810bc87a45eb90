"""The local replacement model of a prompt and its attribution graph (Ameisen et al. 2025, "Circuit Tracing").

Replacement model. One forward of the real model records, at every layer l, the MLP input the transcoders read
(``blocks.l.ln2.hook_normalized``) and the MLP output (``blocks.l.hook_mlp_out``), every attention pattern and
every norm's scale (``*.hook_scale``). With the patterns and scales frozen to those values the model is affine in
what enters the residual stream: the token embeddings (``hook_embed``) and each MLP output. The MLP output is
replaced by the transcoder's output (active features times decoder rows, plus b_dec, plus a skip transcoder's
linear term) plus the error node (true MLP output - transcoder output), so the replacement gives the original
logits (to float rounding).

Graph. Nodes: active features (layer, position, feature), error nodes (layer, position), token embeddings
(position), and the top logits (by probability until ``max_logit_prob`` cumulative, at most ``max_n_logits``).
A target's bias is its value with every source zero: what the attention, norm and transcoder (b_dec) biases give.
A feature target's value is its encoder input W_enc[:, f] . x (the pre-activation without b_enc); a logit target's
is the de-meaned logit (W_U[:, t] - mean_v W_U[:, v]) . unembed input at the last position. The edge from source
s to target t is the direct effect of s on t in the frozen model with every other feature held fixed: the
gradient of t with respect to the residual-stream input where s writes, dotted with what s writes (a feature:
its activation times its decoder row; an error node: its vector; a token: its embedding). Gradients come from
one ``mx.vjp`` of the frozen forward (batch 1) vectorised with ``mx.vmap`` over a batch of ``batch_size`` targets'
cotangents.

Exactness (``tests/circuits``): incoming edges plus the target's bias (its value with every source zero) sum to
its value; an edge equals the finite-difference effect of scaling its source; the replacement's logits equal the
model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import mlx.core as mx
import numpy as np

from ..host import to_floats, to_ints
from ..sae.analysis import unembedding
from ..sae.sae import SAE
from .transcoders import HOOK_OUT, PerLayer, Replacement, as_replacement


@dataclass
class Graph:
    """An attribution graph. ``adjacency`` [n, n] float32: adjacency[t, s] = direct effect of node s on node t;
    node order: features (``active_features`` rows: layer, position, feature), then errors (layer-major, n_layers x
    n_pos), then tokens (n_pos), then logits (``logit_tokens``)."""

    prompt_tokens: list
    str_tokens: list
    active_features: np.ndarray  # [n_features, 3] (layer, pos, feature)
    activations: np.ndarray  # [n_features]
    logit_tokens: list
    logit_probabilities: np.ndarray
    adjacency: np.ndarray
    n_layers: int
    hook_in: list = field(default_factory=list)
    target_values: np.ndarray | None = None  # per target node (features, logits): its value in the replacement
    target_biases: np.ndarray | None = None  # per target node: its value with every source zero

    @property
    def n_pos(self) -> int:
        return len(self.prompt_tokens)

    @property
    def n_features(self) -> int:
        return int(self.active_features.shape[0])

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + len(self.logit_tokens)


class ReplacementModel:
    """``model`` with its MLPs replaced: per-layer transcoders ``{layer: SAE}`` (each reading
    ``blocks.l.ln2.hook_normalized`` and writing ``blocks.l.hook_mlp_out``) or a ``CrossLayerTranscoder``; frozen at
    one prompt (``freeze``)."""

    def __init__(self, model, transcoders: dict[int, SAE] | Replacement):
        self.model = model
        self.n_layers = model.cfg.n_layers
        #: what replaces the MLPs (``transcoders.Replacement``)
        self.rep = as_replacement(transcoders, self.n_layers)
        #: the per-layer transcoders {layer: SAE} (None for a cross-layer transcoder)
        self.transcoders = self.rep.transcoders if isinstance(self.rep, PerLayer) else None

    # -- the real forward, recorded -------------------------------------------------------------------
    def freeze(self, tokens: mx.array) -> dict:
        """One real forward on tokens [P]: everything the frozen model and the graph need."""
        L = self.n_layers
        names = [n for n in self.model.hook_dict if self._is_frozen(n)]
        names += ["hook_embed"] + [f"blocks.{layer}.{self.rep.hook_in}" for layer in range(L)]
        names += [f"blocks.{layer}.{HOOK_OUT}" for layer in range(L)]
        logits, cache = self.model.run_with_cache(tokens[None], names_filter=names)
        frozen = {n: mx.stop_gradient(cache[n]) for n in names if n in cache}
        xs = [cache[f"blocks.{layer}.{self.rep.hook_in}"][0].astype(mx.float32) for layer in range(L)]
        acts = [self.rep.encode(layer, x) for layer, x in enumerate(xs)]  # [P, F] per layer
        decoded = self.rep.decode(acts)  # [P, d] per layer, without the skip terms (the frozen model computes them)
        mlp, errors = [], []
        for layer in range(L):
            # the MLP output less the skip term (the frozen model adds it live): decode + error
            skip = self.rep.skip_term(layer, xs[layer])
            true = cache[f"blocks.{layer}.{HOOK_OUT}"][0].astype(mx.float32)
            mlp.append(true if skip is None else true - skip)
            errors.append(mlp[-1] - decoded[layer])
        mx.eval(logits, frozen, acts, mlp, errors)
        return {"logits": logits[0], "frozen": frozen, "acts": acts, "mlp": mlp, "errors": errors}

    @staticmethod
    def _is_frozen(name: str) -> bool:
        """The hooks whose values the frozen model takes from the prompt's forward: norm scales, patterns."""
        return name.endswith("hook_scale") or name.endswith("attn.hook_pattern")

    def _hooks(self, state: dict, B: int, mlp_out, reads: dict[str, mx.array], also_record: tuple = (),
               n_layers: int | None = None) -> list:
        """The hooks both frozen forwards share: patterns and norm scales from ``state`` (broadcast to B copies),
        each transcoder input (and ``also_record``) recorded into ``reads``, and each MLP output replaced by
        ``mlp_out(layer)`` (in the first ``n_layers`` blocks, all by default; the rest keep their MLPs, for a
        forward that stops before them)."""
        frozen = state["frozen"]

        def const(name):
            return lambda act, hook: mx.broadcast_to(frozen[name], (B, *frozen[name].shape[1:])).astype(act.dtype)

        def record(act, hook):
            reads[hook.name] = act
            return act

        hooks: list = [(n, const(n)) for n in frozen if self._is_frozen(n)]
        for layer in range(self.n_layers if n_layers is None else n_layers):
            hooks.append((f"blocks.{layer}.{self.rep.hook_in}", record))
            hooks.append((f"blocks.{layer}.{HOOK_OUT}", mlp_out(layer)))
        return hooks + [(name, record) for name in also_record]

    # -- the frozen, affine model ----------------------------------------------------------------------
    def frozen_forward(self, tokens: mx.array, state: dict, embed: mx.array, mlp: list[mx.array],
                       n_readouts: int | None = None) -> list[mx.array]:
        """The replacement model, frozen at ``state``, on B copies of the prompt: ``embed`` [B, P, d] enters as the
        token embedding and ``mlp[l]`` [B, P, d] as layer l's MLP output (plus a skip transcoder's term, computed
        from this forward's MLP input). Returns the readouts: every layer's transcoder input [B, P, d_in] and
        the unembedding's input [B, P, d_model]. ``n_readouts`` r <= n_layers: only the first r (layers 0..r-1's
        inputs), running only blocks 0..r-1 (MLP outputs of layers r - 1 and later do not reach them)."""
        L = self.n_layers
        r = L + 1 if n_readouts is None else int(n_readouts)
        B = embed.shape[0]
        reads: dict[str, mx.array] = {}

        def mlp_out(layer):
            name_in = f"blocks.{layer}.{self.rep.hook_in}"

            def fn(act, hook):
                skip = self.rep.skip_term(layer, reads[name_in].astype(mx.float32))  # (linear in the MLP input)
                return (mlp[layer] if skip is None else mlp[layer] + skip).astype(act.dtype)

            return fn

        hooks = self._hooks(state, B, mlp_out, reads, also_record=("unembed.hook_in",), n_layers=min(r, L))
        hooks.append(("hook_embed", lambda act, hook: embed.astype(act.dtype)))
        self.model.run_with_hooks(mx.broadcast_to(tokens[None], (B, tokens.shape[0])), fwd_hooks=hooks,
                                  **({"stop_at_layer": r} if r <= L else {}))
        names = [f"blocks.{layer}.{self.rep.hook_in}" for layer in range(L)] + ["unembed.hook_in"]
        return [reads[n].astype(mx.float32) for n in names[:r]]

    def run(self, tokens: mx.array, state: dict, edit=None) -> mx.array:
        """The local replacement model on ``tokens`` [P] as a model: attention patterns, norm scales and error nodes
        frozen at ``state``, each MLP replaced by its transcoder (features recomputed from this forward's MLP input,
        then ``edit(layer, acts [P, F])`` applied) plus the error node. Returns logits [P, V]; without an edit they are
        the model's (to float rounding)."""
        errors = state["errors"]
        reads: dict[str, mx.array] = {}
        acts: list[mx.array] = []  # this forward's features, layer by layer (a CLT's layer reads all earlier ones)

        def mlp_out(layer):
            def fn(act, hook):
                x = reads[f"blocks.{layer}.{self.rep.hook_in}"][0].astype(mx.float32)
                f = self.rep.encode(layer, x)
                acts.append(f if edit is None else edit(layer, f))
                y = self.rep.decode_layer(layer, acts)
                skip = self.rep.skip_term(layer, x)
                return ((y if skip is None else y + skip) + errors[layer])[None].astype(act.dtype)

            return fn

        hooks = self._hooks(state, 1, mlp_out, reads)
        return self.model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]

    def sources(self, state: dict) -> tuple[mx.array, list[mx.array]]:
        """The real injections: token embeddings [P, d] and per layer the MLP output replacement (transcoder
        decode + error, the skip term left to the frozen model) [P, d]."""
        return state["frozen"]["hook_embed"][0].astype(mx.float32), list(state["mlp"])

    def errors(self, state: dict) -> list[mx.array]:
        """Per layer the error node vectors [P, d]: true MLP output - transcoder output (skip term included)."""
        return list(state["errors"])


def _logit_targets(logits: mx.array, max_n_logits: int, max_logit_prob: float) -> tuple[list[int], np.ndarray]:
    probs = np.array(mx.softmax(logits[-1].astype(mx.float32)), dtype=np.float64)
    order = np.argsort(-probs)
    keep = []
    total = 0.0
    for t in order[:max_n_logits]:
        keep.append(int(t))
        total += probs[t]
        if total >= max_logit_prob:
            break
    return keep, probs[keep]


def bytes_per_target(n_layers: int, n_pos: int, d_model: int) -> int:
    """The memory one target of a batch takes in a backward through ``n_layers`` blocks: ~6 float32 [P, d_model]
    activations per layer (measured: 0.35 MB per copy for 4 layers x 16 tokens x d 256)."""
    return 6 * 4 * n_layers * n_pos * d_model


def auto_batch_size(n_layers: int, n_pos: int, d_model: int, memory_gb: float = 1.0) -> int:
    """Targets per batch whose backward through ``n_layers`` blocks takes about ``memory_gb``
    (``bytes_per_target``). Between 16 and 1024; larger batches amortise the per-batch work (measured on 2 CPU
    cores: 32 -> 512 targets per batch took 6.4 s -> 3.2 s for 2,731 features)."""
    return int(min(1024, max(16, memory_gb * 1e9 // bytes_per_target(n_layers, n_pos, d_model))))


def attribute(model, transcoders: dict[int, SAE] | Replacement, prompt, *, max_n_logits: int = 10, max_logit_prob: float = 0.95,
              batch_size: int | None = None, prepend_bos: bool | None = None, zero_positions: int = 1,
              memory_gb: float | None = None) -> Graph:
    """The attribution graph of ``prompt`` (a string or token ids [P]) through ``transcoders``: per-layer
    transcoders {layer: SAE} or a ``CrossLayerTranscoder`` (whose features have edges into every later layer).

    ``batch_size``: targets per vector-Jacobian product; by default each batch holds as many targets as fit in
    about ``memory_gb`` (default 1) of activations for its backward (``auto_batch_size``: a batch of early-layer
    targets runs fewer blocks, so it holds more), at most 1024. Larger batches amortise the per-batch work;
    measured on an H200 (8 layers, 11k features): a budget of 1 GB took 0.31 s and 2.2 GB at the peak, 2 GB 0.30 s
    and 3.3 GB, 0.5 GB 0.37 s and 1.4 GB (``benchmarks/results/circuits_h200.json``).

    ``zero_positions``: the first positions (by default 1: the BOS token, as circuit-tracer does) carry no feature
    and no error nodes; their MLP outputs are constants of the frozen model, like the biases. 0 attributes every
    position."""
    rm = ReplacementModel(model, transcoders)
    tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)[0] if isinstance(prompt, str) else mx.array(prompt)
    if tokens.ndim != 1:
        raise ValueError(f"attribute takes one prompt; got tokens of shape {tuple(tokens.shape)}.")
    P, L = tokens.shape[0], rm.n_layers
    z = int(zero_positions)
    if not 0 <= z < P:
        raise ValueError(f"zero_positions = {zero_positions}; expected 0 <= zero_positions < {P} (the prompt's length).")
    state = rm.freeze(tokens)
    embed, mlp = rm.sources(state)
    d_model = embed.shape[-1]
    if memory_gb is None:
        memory_gb = 1.0
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}; expected a positive number of targets per batch.")
    keep = (mx.arange(P) >= z)[:, None]  # [P, 1]: positions whose features and errors are nodes
    errors = [mx.where(keep, e, 0.0) for e in rm.errors(state)]

    # nodes, in circuit-tracer's order: (layer, position, feature)
    layer_acts = [np.array(state["acts"][layer]) for layer in range(L)]
    for a in layer_acts:
        a[:z] = 0
    active = np.array([(layer, p, f) for layer in range(L) for p, f in zip(*np.nonzero(layer_acts[layer] > 0))],
                      dtype=np.int64).reshape(-1, 3)
    acts = np.concatenate([layer_acts[layer][tuple(active[active[:, 0] == layer, 1:].T)]
                           for layer in range(L)]).astype(np.float32)
    logit_tokens, logit_probs = _logit_targets(state["logits"], max_n_logits, max_logit_prob)
    W_U = unembedding(model).astype(mx.float32)  # [d_model, d_vocab]
    U = W_U[:, mx.array(logit_tokens)] - mx.mean(W_U, axis=1, keepdims=True)  # [d_model, n_logits]

    nF, nE, nT, nL = len(active), L * P, P, len(logit_tokens)
    n = nF + nE + nT + nL
    adjacency = np.zeros((n, n), dtype=np.float32)
    # source side: features are sorted by layer, then position, so each (layer, position) is a contiguous run of
    # columns, whose edges are one GEMM of that position's gradients with the run's decoder rows scaled by the
    # activations
    src = []  # per (layer, position) with features, in column order: (layer, position, [n_out * d, n] decoder rows)
    rep = rm.rep
    site = active[:, 0] * P + active[:, 1]  # non-decreasing: the runs are np.unique's
    sites, firsts = np.unique(site, return_index=True)
    for s_, lo, hi in zip(sites.tolist(), firsts.tolist(), [*firsts[1:].tolist(), len(site)]):
        layer, p = divmod(s_, P)
        rows = rep.decoder_rows(layer, mx.array(active[lo:hi, 2])) * mx.array(acts[lo:hi])[:, None, None]
        n, n_out, d = rows.shape  # what each feature writes to each of its output layers
        src.append((layer, p, rows.transpose(1, 2, 0).reshape(n_out * d, n)))

    # every source zero: the token embeddings and the feature and error parts of each MLP replacement; what is
    # left of an MLP output is its transcoder's b_dec (a bias, like the attention and norm biases)
    # (at the zeroed positions the whole MLP output is such a constant)
    zeros = [mx.zeros((1, P, embed.shape[-1]))] + [
        mx.where(keep, rep.b_dec(layer), m)[None] for layer, m in enumerate(mlp)]
    values, biases = [], []

    # each target's cotangent: its readout (layer r's transcoder input, or the unembedding input r = L), its
    # position, and its vector (a feature's encoder column, a logit's de-meaned unembedding column). Per batch and
    # readout: a one-hot [B, P] of the positions (host, small) times the gathered vectors [B, d] (device): one
    # broadcast product, no scatter and no host array of B x P x d
    # the targets: every feature (its encoder input), then every logit (the unembedding input at the last position)
    t_read = np.concatenate([active[:, 0], np.full(nL, L)])
    t_pos = np.concatenate([active[:, 1], np.full(nL, P - 1)])
    t_col = np.concatenate([active[:, 2], np.arange(nL)])
    n_targets = nF + nL
    readouts = [rep.encoder(r).astype(mx.float32) for r in range(L)] + [U]  # [d, columns] per readout

    def readout_vectors(start, stop):
        """Per readout (L transcoder inputs, the unembed input): the cotangent [B, P, d] of targets start:stop."""
        B = stop - start
        cts = []
        for r in range(L + 1):
            sel = np.nonzero(t_read[start:stop] == r)[0]
            if not len(sel):
                cts.append(mx.broadcast_to(mx.array(0.0), (B, P, readouts[r].shape[0])))
                continue
            onehot = np.zeros((B, P), dtype=np.float32)
            onehot[sel, t_pos[start + sel]] = 1.0
            cols = np.zeros(B, dtype=np.int64)
            cols[sel] = t_col[start + sel]
            cts.append(mx.array(onehot)[:, :, None] * readouts[r][:, mx.array(cols)].T[:, None, :])
        return cts

    # the readouts with the real sources and with every source zero (the same for every target: computed once);
    # a target's value and bias are its cotangent's dot products with them
    real = [embed[None]] + [m[None] for m in mlp]
    real_outs = rm.frozen_forward(tokens, state, real[0], real[1:])
    zero_outs = rm.frozen_forward(tokens, state, zeros[0], zeros[1:])

    @cache
    def batched_vjp(r: int):
        """The VJP of the readouts 0..r (layer r's input; r = L: the unembedding's) with respect to the sources
        that reach them (token embeddings, MLP outputs of layers < r), through the blocks before layer r only.
        The frozen model is affine in its sources, so its VJP does not depend on them: one forward of the prompt
        (batch 1) and the backward vectorised over the batch's cotangents (mx.vmap), not a forward of B copies."""
        primals = real[:r + 1]

        def frozen(e, *m):
            return rm.frozen_forward(tokens, state, e, list(m) + real[1 + len(m):], n_readouts=r + 1)

        def vjp_one(*cts):
            return tuple(mx.vjp(frozen, primals, list(cts))[1])

        return mx.vmap(vjp_one, in_axes=(0,) * (r + 1))

    # targets are sorted by readout, and a target reading layer r's input depends only on sources before layer r
    # (the gradient reaching any later MLP output is exactly zero): a batch runs the backward of the blocks below
    # its last readout only, and holds as many targets as fit in the memory budget for that depth
    def batch_end(start: int) -> int:
        if batch_size is not None:
            return min(start + batch_size, n_targets)
        n = auto_batch_size(min(int(t_read[start]) + 1, L), P, d_model, memory_gb)
        while True:
            stop = min(start + n, n_targets)
            n2 = auto_batch_size(min(int(t_read[stop - 1]) + 1, L), P, d_model, memory_gb)
            if n2 >= n:
                return stop
            n = n2

    start = 0
    while start < n_targets:
        stop = batch_end(start)
        r_max = int(t_read[start:stop].max())
        cts = readout_vectors(start, stop)[:r_max + 1]
        grads = [g[:, 0] for g in batched_vjp(r_max)(*[c[:, None] for c in cts])]
        val = mx.stack([mx.sum(o * c, axis=(1, 2)) for o, c in zip(real_outs, cts)]).sum(axis=0)
        bias = mx.stack([mx.sum(o * c, axis=(1, 2)) for o, c in zip(zero_outs, cts)]).sum(axis=0)
        g_embed, g_mlp = grads[0], grads[1:]  # g_mlp: layers < r_max
        rows_t = np.arange(start, stop)  # a target's row: features first, logits after the error and token nodes
        rows_t[rows_t >= nF] += nE + nT
        # token sources: embedding . gradient
        tok = mx.sum(g_embed * embed[None], axis=-1)  # [B, P]
        # error sources (layers < r_max: the first r_max * P error columns), and feature sources: activation *
        # (decoder row . gradient), [B, n] per (layer, position) run: its gradients at every output layer before
        # r_max . the decoder rows written there; the runs of layers < r_max are a prefix [0, n_cols) of the columns
        err = [mx.sum(g_mlp[layer] * errors[layer][None], axis=-1) for layer in range(r_max)]  # [B, P] each
        feat = []
        n_cols = 0
        for layer, p, decT in src:
            if layer >= r_max:
                break
            outs = [t for t in rep.out_layers(layer) if t < r_max]  # consecutive from `layer`
            rows = decT[:len(outs) * (decT.shape[0] // len(rep.out_layers(layer)))]
            feat.append(mx.concatenate([g_mlp[t][:, p] for t in outs], axis=-1) @ rows)
            n_cols += int(decT.shape[1])
        edges = mx.concatenate([*feat, *err, tok], axis=1)
        mx.eval(edges, val, bias)
        # read straight from MLX's buffer (np.asarray takes it without a copy: on a GPU, a host temporary costs
        # more than the product)
        e = np.asarray(edges)
        adjacency[rows_t, :n_cols] = e[:, :n_cols]
        adjacency[rows_t, nF:nF + r_max * P] = e[:, n_cols:n_cols + r_max * P]
        adjacency[rows_t, nF + nE:nF + nE + nT] = e[:, n_cols + r_max * P:]
        values.extend(to_floats(val))
        biases.extend(to_floats(bias))
        start = stop
    return Graph(prompt_tokens=to_ints(tokens), str_tokens=list(model.to_str_tokens(tokens)), active_features=active,
                 activations=acts, logit_tokens=logit_tokens, logit_probabilities=logit_probs.astype(np.float32),
                 adjacency=adjacency, n_layers=L, hook_in=[f"blocks.{layer}.{rep.hook_in}" for layer in range(L)],
                 target_values=np.array(values, dtype=np.float64), target_biases=np.array(biases, dtype=np.float64))
