"""Regenerate tests/sae/data/saelens_6.54.12/: small SAEs written by SAELens itself, with SAELens's outputs.

Run it with a Python that has ``sae-lens==6.54.12`` (and torch) installed, not hooked_mlx's venv::

    /work/slvenv/bin/python tests/sae/make_saelens_fixtures.py

(``benchmarks/sae_trainer.py`` creates that venv.) For each case it builds the SAELens SAE class with random
weights (every parameter drawn, so that biases, thresholds and decoder norms all matter), saves it with
SAELens's own writer (``save_model``; ``save_inference_model`` for the BatchTopK training SAE, which SAELens
turns into a JumpReLU with one threshold), and writes ``expected.safetensors``: inputs ``x`` [N, d_in] and
SAELens's ``feature_acts`` (``encode``) and ``sae_out`` (``forward``) for them, float32. The files are small
(d_in 24, d_sae 40; the transcoders read ``blocks.1.ln2.hook_normalized``) and committed; tests/sae/test_sae_saelens_fixtures.py loads them with hooked_mlx.
"""

import json
import os
import shutil
import sys

import sae_lens
import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", f"saelens_{sae_lens.__version__}")
D_IN, D_SAE, N = 24, 40, 64


def _randomize(sae, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name in ("threshold", "log_threshold"):
                p.copy_(0.3 * r.abs() if name == "threshold" else torch.log(0.3 * r.abs() + 1e-3))
            elif name.startswith("b_"):
                p.copy_(0.5 * r)
            else:
                p.copy_(r / D_IN**0.5)


def cases():
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    from sae_lens.saes.transcoder import (
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        Transcoder,
        TranscoderConfig,
    )

    common = dict(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu")
    yield "standard", StandardSAE(StandardSAEConfig(**common)), "save_model"
    yield "standard_no_b_dec_in", StandardSAE(StandardSAEConfig(**common, apply_b_dec_to_input=False)), "save_model"
    yield "jumprelu", JumpReLUSAE(JumpReLUSAEConfig(**common)), "save_model"
    yield "topk", TopKSAE(TopKSAEConfig(**common, k=6)), "save_model"
    yield "topk_rescaled", TopKSAE(TopKSAEConfig(**common, k=6, rescale_acts_by_decoder_norm=True)), "save_model"
    bt = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=6))
    yield "batchtopk_inference", bt, "save_inference_model"
    # not loadable by hooked_mlx yet: the tests check that it is refused with a message naming it
    yield "gated", GatedSAE(GatedSAEConfig(**common)), "save_model"
    # transcoders: read an MLP's input (this hook), predict its output
    tc = dict(common, apply_b_dec_to_input=False)
    yield "transcoder", Transcoder(TranscoderConfig(**tc, d_out=D_IN)), "save_model"
    yield "skip_transcoder", SkipTranscoder(SkipTranscoderConfig(**tc, d_out=D_IN + 8)), "save_model"
    yield "jumprelu_transcoder", JumpReLUTranscoder(JumpReLUTranscoderConfig(**tc, d_out=D_IN)), "save_model"


def main() -> int:
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    for i, (name, sae, writer) in enumerate(cases()):
        _randomize(sae, seed=i)
        if name == "batchtopk_inference":
            with torch.no_grad():
                sae.topk_threshold.fill_(0.4)  # the running threshold the inference model keeps
        if "transcoder" in name:
            sae.cfg.metadata.hook_name = "blocks.1.ln2.hook_normalized"
        sae.eval()
        folder = os.path.join(OUT, name)
        getattr(sae, writer)(folder)
        # what SAELens itself computes, from the files it wrote (its own loader)
        loaded = sae_lens.SAE.load_from_disk(folder, device="cpu")
        x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(100 + i))
        with torch.no_grad():
            f = loaded.encode(x)
            out = loaded(x)
        save_file({"x": x.contiguous(), "feature_acts": f.contiguous(), "sae_out": out.contiguous()},
                  os.path.join(folder, "expected.safetensors"))
        with open(os.path.join(folder, "cfg.json")) as fh:
            arch = json.load(fh).get("architecture")
        print(f"{name:22s} {type(loaded).__name__:18s} architecture={arch} L0={float((f > 0).sum(-1).float().mean()):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
