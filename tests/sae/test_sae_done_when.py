"""The issue's done-when: a TopK SAE (16x, k = 16) trained on stories260K residual-stream activations reaches
FVU < 0.2 at L0 = 16 on held-out text, within a CI-sized run; plus the spliced-in CE loss recovered."""

from __future__ import annotations

import time

from hooked_mlx.sae import SAEConfig, ShardSource, evaluate_model, evaluate_reconstruction, train_sae
from hooked_mlx.sae import metrics as M
import pytest
from sae_fixtures import HOOK

STEPS, BATCH = 200, 1024


def test_topk_16x_k16_reaches_fvu_below_0_2(stories, harvested, corpus_docs):
    train_dir, held_out = harvested
    cfg = SAEConfig(architecture="topk", hook_name=HOOK, expansion_factor=16, k=16, lr=3e-3, lr_warmup_steps=20,
                    train_batch_size_tokens=BATCH, shuffle_buffer_tokens=BATCH, training_tokens=STEPS * BATCH,
                    log_every_steps=50, norm_estimation_tokens=16 * BATCH)
    t0 = time.perf_counter()
    sae = train_sae(cfg, ShardSource(str(train_dir), BATCH, seed=cfg.seed), progress=False)
    elapsed = time.perf_counter() - t0
    assert sae.d_in == 64 and sae.d_sae == 1024
    r = evaluate_reconstruction(sae, held_out)  # documents never trained on
    print(f"\nTopK 16x k=16 on {HOOK}: {STEPS * BATCH:,} tokens in {elapsed:.1f}s; held-out ({held_out.shape[0]:,} "
          f"tokens) FVU {r[M.FVU]:.4f}, L0 {r[M.L0]:.2f}, dead-free fraction {1 - r[M.UNFIRED_FRACTION]:.3f}")
    assert r[M.L0] == pytest.approx(16.0)
    assert r[M.FVU] < 0.2
    assert sae.history[-1][M.FVU] < 0.2
    spliced = evaluate_model(stories, sae, corpus_docs[340:348], batch_size=8)
    print(f"CE clean {spliced[M.CE_LOSS_CLEAN]:.4f}, with SAE {spliced[M.CE_LOSS_SAE]:.4f}, zero-ablated "
          f"{spliced[M.CE_LOSS_ZERO_ABLATION]:.4f}: CE loss recovered {spliced[M.CE_LOSS_RECOVERED]:.3f}, "
          f"KL score {spliced[M.KL_SCORE]:.3f}")
    assert spliced[M.CE_LOSS_RECOVERED] > 0.8
