"""``FusedTopKStep``: the bare fused TopK step (arrays in, arrays out; no SAE objects or configs)."""

from __future__ import annotations

import mlx.core as mx

from . import fused as FU


class FusedTopKStep:
    """The bare fused TopK SAE step on a dict of parameters (W_enc [D,F], b_enc, W_dec [F,D], b_dec): the
    compiled custom-VJP forward/backward of ``topk_sae_loss`` (FVU), then the fused optimizer passes
    (``fused_adam_renorm`` for the decoder, fused Adam for the rest). No clipping, AuxK, metrics or
    non-finite guard: the ceiling that ``SAETrainer`` is measured against (benchmarks/sae_trainer.py)."""

    def __init__(self, params, k, lr, betas=(0.9, 0.999), eps=1e-8, ops=None, low_memory=None):
        ops = FU.get_ops() if ops is None else FU.get_ops(ops) if isinstance(ops, str) else ops  # self-checked
        nbytes = sum(p.nbytes for p in params.values())
        # low_memory: evaluate the gradients first, then each parameter's update on its own, so the old and
        # new (p, m, v) of only one parameter coexist (a custom kernel cannot update in place). Costs two
        # extra synchronisations per step; on by default above 4 GB of parameters.
        self.low_memory = nbytes > 4e9 if low_memory is None else bool(low_memory)
        self.params = dict(params)
        self.state = {n: (mx.zeros_like(p), mx.zeros_like(p)) for n, p in params.items()}
        self.k, self.lr, self.betas, self.eps, self.ops = k, lr, betas, eps, ops
        self.t = 0

        # keep the low-precision copies (W_enc's bf16 matmul operand, W_dec's bf16 rows) from the Adam passes
        self.lowp = ops.matmul_dtype is not None
        self.W_lowp = params["W_enc"].astype(ops.matmul_dtype) if self.lowp else mx.zeros((0,), mx.bfloat16)
        self.dec_lowp = ops.decoder_dtype is not None
        self.Wd_lowp = params["W_dec"].astype(ops.decoder_dtype) if self.dec_lowp else mx.zeros((0,), mx.bfloat16)

        def loss(params, x, W_lowp, Wd_lowp):
            l, (fvu, aux, out) = FU.topk_sae_loss(x, params["W_enc"], params["b_enc"], params["W_dec"],
                                                  params["b_dec"], k, W_enc_lowp=W_lowp, W_dec_lowp=Wd_lowp,
                                                  ops=ops)
            return l

        self.grad_fn = mx.compile(mx.value_and_grad(loss))
        mx.eval(self.params, self.state, self.W_lowp, self.Wd_lowp)

    def __call__(self, x):
        self.t += 1
        loss, g = self.grad_fn(self.params, x, self.W_lowp, self.Wd_lowp)
        if self.low_memory:
            mx.eval(loss, g)
        p, s = self.params, self.state
        new_p, new_s = {}, {}
        out = FU.fused_adam_renorm(p["W_dec"], g["W_dec"], *s["W_dec"], lr=self.lr, step=self.t,
                                   betas=self.betas, eps=self.eps, lowp_copy=self.dec_lowp, ops=self.ops)
        W, m, v = out[:3]
        if self.dec_lowp:
            self.Wd_lowp = out[3]
        new_p["W_dec"], new_s["W_dec"] = W, (m, v)
        if self.low_memory:
            del p["W_dec"], s["W_dec"], g["W_dec"]
            mx.eval(W, m, v, self.Wd_lowp)
        for n in ("W_enc", "b_enc", "b_dec"):
            if n == "W_enc" and self.lowp:
                q, m, v, self.W_lowp = FU.adam(p[n], g[n], *s[n], lr=self.lr, step=self.t, betas=self.betas,
                                               eps=self.eps, lowp_copy=True, ops=self.ops)
            else:
                q, m, v = FU.adam(p[n], g[n], *s[n], lr=self.lr, step=self.t, betas=self.betas, eps=self.eps,
                                  ops=self.ops)
            new_p[n], new_s[n] = q, (m, v)
        del p, s, g
        self.params, self.state = new_p, new_s
        mx.eval(loss, self.params, self.state, self.W_lowp, self.Wd_lowp)
        return loss
