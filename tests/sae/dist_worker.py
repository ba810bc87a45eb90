"""One rank of the data-parallel SAE test (run by test_sae_distributed.py under ``mlx.launch``).

``python dist_worker.py OUT_DIR [CKPT] [GRAD_REDUCE_DTYPE]``: trains three SAEs (TopK + AuxK, BatchTopK + AuxK, JumpReLU)
and a TopK skip transcoder from
one ``ArraySource`` on the global group and writes this rank's final parameters to OUT_DIR/rank{r}.npz; with
one process (no launcher) it is the reference run on the same global batches.

``python dist_worker.py --stream MODEL CORPUS OUT_DIR``: streaming from the model (each rank its own
documents): an uninterrupted run, and a run stopped after its step-5 checkpoint then resumed; writes both
final W_dec to OUT_DIR/stream_rank{r}.npz.
"""

from __future__ import annotations

import sys

from hooked_mlx.sae import ArraySource, SAEConfig, distributed  # (hooked_mlx first: see hooked_mlx/_blas.py)
from hooked_mlx.sae.distributed import world
from hooked_mlx.sae.training import train_saes
import numpy as np

# W_enc / W_dec (16 x 128) take the per-tensor all_sum, the biases the packed one: both paths run
distributed.PACK_LIMIT = 1024
HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
#: a skip transcoder trained beside the SAEs: input -> target
TC_IN, TC_OUT = "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"
B, STEPS = 64, 8


def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(96, 16))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    codes = (rng.random((2048, 96)) < 3 / 96) * rng.exponential(1.0, (2048, 96))
    return (codes @ dirs + 0.3).astype(np.float32)


def configs(reduce_dtype: str = "auto") -> list[SAEConfig]:
    common = {"grad_reduce_dtype": reduce_dtype, "train_batch_size_tokens": B, "training_tokens": B * STEPS, "lr": 3e-3, "lr_warmup_steps": 2,
              "norm_estimation_tokens": 2 * B, "dead_tokens_window": 2 * B, "log_every_steps": 4, "seed": 3}
    return [
        SAEConfig(hook_name=HOOKS[0], architecture="topk", k=4, expansion_factor=8, aux_k=8, **common),
        SAEConfig(hook_name=HOOKS[1], architecture="batchtopk", k=4, expansion_factor=8, **common),
        SAEConfig(hook_name=HOOKS[2], architecture="jumprelu", expansion_factor=8, **common),
        SAEConfig(hook_name=TC_IN, hook_name_out=TC_OUT, skip_connection=True, apply_b_dec_to_input=False,
                  architecture="topk", k=4, expansion_factor=8, aux_k=8, **common),
    ]


def train(checkpoint_path=None, resume=False, reduce_dtype="auto"):
    x = data()
    y = np.tanh(x @ np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32) / 4)  # the target
    source = ArraySource({**{h: x for h in HOOKS}, TC_IN: x, TC_OUT: y}, B, seed=1)
    return train_saes(configs(reduce_dtype), source, checkpoint_path=checkpoint_path, resume=resume, progress=False)


def params(result) -> dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    out = {}
    for t in result.trainers:
        h = t.cfg.hook_name
        for k, v in tree_flatten(t.sae.parameters()):
            out[f"{h}/{k}"] = np.array(v)
        out[f"{h}/tokens_since_fired"] = np.array(t.aux["tokens_since_fired"])
        out[f"{h}/theta"] = np.array(t.aux["theta"])
    for step, h, m in result.history:
        for k, v in m.items():
            out[f"metric/{step}/{h}/{k}"] = np.array(v)
    return out


def stream_runs(model_path: str, corpus: str, out: str) -> None:
    from hooked_mlx import HookedTransformer
    from hooked_mlx.sae import ActivationStore

    model = HookedTransformer.from_pretrained(model_path)
    hook = "blocks.0.hook_resid_post"
    cfg = SAEConfig(hook_name=hook, architecture="topk", k=4, expansion_factor=2, train_batch_size_tokens=128,
                    shuffle_buffer_tokens=512, training_tokens=1280, context_size=32, store_batch_size_prompts=4,
                    norm_estimation_tokens=256, checkpoint_every_steps=5, log_every_steps=1, seed=2)

    def run(ck, resume=False, stop_at=None):
        def cb(step, mets):
            if stop_at is not None and step == stop_at:
                raise RuntimeError("stop")
        try:
            res = train_saes(cfg, ActivationStore(model, hook, corpus, cfg), checkpoint_path=ck, resume=resume,
                             progress=False, callback=cb)
        except RuntimeError:
            return None
        return np.array(res.trainers[0].sae.W_dec)

    full = run(f"{out}/ck_full")
    assert run(f"{out}/ck_cut", stop_at=6) is None
    resumed = run(f"{out}/ck_cut", resume=True)
    np.savez(f"{out}/stream_rank{world().rank}.npz", full=full, resumed=resumed)


if __name__ == "__main__":
    w = world()
    if sys.argv[1] == "--stream":
        stream_runs(*sys.argv[2:5])
        sys.exit(0)
    ck = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    res = train(checkpoint_path=ck, reduce_dtype=sys.argv[3] if len(sys.argv) > 3 else "auto")
    np.savez(f"{sys.argv[1]}/rank{w.rank}.npz", size=np.array(w.size), **params(res))
