"""One rank of the data-parallel CLT test (run by test_sae_distributed.py under ``mlx.launch``).

``python clt_dist_worker.py OUT_DIR [CKPT]``: trains a 3-layer TopK cross-layer transcoder from one ``ArraySource``
on the global group and writes this rank's final parameters to OUT_DIR/clt_rank{r}.npz; with one process (no
launcher) it is the reference run on the same global batches.
"""

from __future__ import annotations

import sys

from hooked_mlx.circuits.clt_training import train_clt  # (hooked_mlx first: see hooked_mlx/_blas.py)
from hooked_mlx.sae import ArraySource, SAEConfig
from hooked_mlx.sae.distributed import world
import numpy as np

L, D, B, STEPS = 3, 16, 64, 8


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(1024, D)).astype(np.float32) for _ in range(L)]
    mats = [rng.normal(size=(D, D)).astype(np.float32) / 4 for _ in range(L)]
    out = {}
    for layer in range(L):
        out[f"blocks.{layer}.ln2.hook_normalized"] = xs[layer]
        y = sum(np.tanh(xs[s] @ mats[layer - s]) for s in range(layer + 1))  # each output reads earlier inputs
        out[f"blocks.{layer}.hook_mlp_out"] = y.astype(np.float32)
    return out


def train(checkpoint_path=None, resume=False, arch="topk", callback=None):
    # (256 features, k 2, a window of 2 batches: over half the features are dead from step 3, so AuxK runs)
    cfg = SAEConfig(architecture=arch, k=2, d_sae=256, lr=3e-3, lr_warmup_steps=2, train_batch_size_tokens=B,
                    training_tokens=B * STEPS, log_every_steps=4, seed=3, checkpoint_every_steps=4,
                    sparsity_warmup_steps=4, dead_tokens_window=2 * B)  # (AuxK runs from step 3)
    return train_clt(cfg, ArraySource(data(), B, seed=1), n_layers=L, checkpoint_path=checkpoint_path, resume=resume,
                     progress=False, callback=callback)


def params(clt) -> dict[str, np.ndarray]:
    out = {f"W_enc{layer}": np.array(w) for layer, w in enumerate(clt.W_enc)}
    out.update({f"W_dec{layer}": np.array(w) for layer, w in enumerate(clt.W_dec)})
    out.update(b_enc=np.array(clt.b_enc), b_dec=np.array(clt.b_dec_))
    if clt.threshold is not None:
        out["threshold"] = np.array(clt.threshold)
    return out


if __name__ == "__main__":
    w = world()
    ck = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    for arch in ("topk", "jumprelu"):
        clt = train(checkpoint_path=f"{ck}_{arch}" if ck else None, arch=arch)
        np.savez(f"{sys.argv[1]}/clt_{arch}_rank{w.rank}.npz", size=np.array(w.size), **params(clt))
