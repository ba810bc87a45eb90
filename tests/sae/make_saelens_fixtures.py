"""Regenerate tests/sae/data/saelens_6.54.12/: small SAEs written by SAELens itself, with SAELens's outputs.

Run it with a Python that has ``sae-lens==6.54.12`` (and torch) installed, not hooked_mlx's venv::

    /work/slvenv/bin/python tests/sae/make_saelens_fixtures.py
    /work/slvenv/bin/python tests/sae/make_saelens_fixtures.py --out DIR          # elsewhere (the live test)
    /work/slvenv/bin/python tests/sae/make_saelens_fixtures.py --check-exports DIR

``--check-exports DIR``: the reverse direction. Each subfolder of DIR is an SAE that hooked_mlx exported
(``export_saelens``) with an ``inputs.safetensors`` (``x``) beside it; SAELens loads it with its own loader and
writes its ``feature_acts`` and ``sae_out`` for those inputs to ``saelens_outputs.safetensors`` there.

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
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
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
    mt = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**common, k=6, matryoshka_widths=[10, 25, 40]))
    yield "matryoshka_batchtopk_inference", mt, "save_inference_model"
    yield "gated", GatedSAE(GatedSAEConfig(**common)), "save_model"
    # SAELens's normalisations: expected_average_only_in is folded before saving (identity at run time);
    # constant_norm_rescale and layer_norm are applied to every input token at run time
    for norm in ("expected_average_only_in", "constant_norm_rescale", "layer_norm"):
        yield f"standard_{norm}", StandardSAE(StandardSAEConfig(**common, normalize_activations=norm)), "save_model"
    yield "topk_layer_norm", TopKSAE(TopKSAEConfig(**common, k=6, normalize_activations="layer_norm")), "save_model"
    # an SAE on stories260K's residual stream (d_model 64; the README loads it into that model)
    yield "stories_topk", TopKSAE(TopKSAEConfig(d_in=64, d_sae=128, k=8, dtype="float32", device="cpu")), "save_model"
    # an attention hook_z SAE: SAELens flattens [..., n_heads, d_head] (here 4 x 6) to d_in 24
    yield "hook_z", StandardSAE(StandardSAEConfig(**common, reshape_activations="hook_z")), "save_model"
    # transcoders: read an MLP's input (this hook), predict its output
    tc = dict(common, apply_b_dec_to_input=False)
    yield "transcoder", Transcoder(TranscoderConfig(**tc, d_out=D_IN)), "save_model"
    yield "skip_transcoder", SkipTranscoder(SkipTranscoderConfig(**tc, d_out=D_IN + 8)), "save_model"
    yield "jumprelu_transcoder", JumpReLUTranscoder(JumpReLUTranscoderConfig(**tc, d_out=D_IN)), "save_model"


def check_exports(root: str) -> int:
    from safetensors.torch import load_file

    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        loaded = sae_lens.SAE.load_from_disk(folder, device="cpu")
        x = load_file(os.path.join(folder, "inputs.safetensors"))["x"]
        with torch.no_grad():
            out = {"feature_acts": loaded.encode(x).contiguous(), "sae_out": loaded(x).contiguous()}
        save_file(out, os.path.join(folder, "saelens_outputs.safetensors"))
        print(f"{name:22s} loaded by SAELens as {type(loaded).__name__}")
    return 0


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--check-exports"]:
        return check_exports(args[1])
    out_root = args[1] if args[:1] == ["--out"] else OUT
    if os.path.exists(out_root):
        shutil.rmtree(out_root)
    os.makedirs(out_root)
    for i, (name, sae, writer) in enumerate(cases()):
        _randomize(sae, seed=i)
        if name.endswith("batchtopk_inference"):
            with torch.no_grad():
                sae.topk_threshold.fill_(0.4)  # the running threshold the inference model keeps
        if "transcoder" in name:
            sae.cfg.metadata.hook_name = "blocks.1.ln2.hook_normalized"
        if name == "hook_z":
            sae.cfg.metadata.hook_name = "blocks.0.attn.hook_z"
        if name == "stories_topk":
            sae.cfg.metadata.hook_name = "blocks.2.hook_resid_post"
            sae.cfg.metadata.model_name = "stories260K"
        sae.eval()
        folder = os.path.join(out_root, name)
        getattr(sae, writer)(folder)
        # what SAELens itself computes, from the files it wrote (its own loader)
        loaded = sae_lens.SAE.load_from_disk(folder, device="cpu")
        x = torch.randn(N, sae.cfg.d_in, generator=torch.Generator().manual_seed(100 + i))
        if "norm" in name:  # activations off the unit scale with a mean, so that the normalisations matter
            x = 3.0 * x + 0.7
        if name == "hook_z":
            x = x.reshape(N, 4, D_IN // 4)
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
