"""Transcoders: read one activation, predict another (``SAEConfig.d_out`` / ``hook_name_out`` /
``skip_connection``). SAELens-written transcoders load with SAELens's outputs (test_sae_saelens_fixtures.py);
here: spliced into stories260K (the MLP output replaced by the transcoder's prediction from the MLP input, the
error term restoring the model exactly), files round trips, and what is refused."""

from __future__ import annotations

import json

from hooked_mlx.sae import SAE, SAEConfig, SAETrainer, export_saelens, load_sae, load_saelens, save_sae
from hooked_mlx.sae.splice import HookedSAETransformer
import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

IN, OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def smodel(stories_path):
    return HookedSAETransformer.from_pretrained(stories_path)


def _transcoder(d, arch="relu", skip=False, seed=0):
    cfg = SAEConfig(architecture=arch, d_in=d, d_sae=4 * d, k=8, apply_b_dec_to_input=False, hook_name=IN,
                    hook_name_out=OUT, skip_connection=skip, decoder_unit_norm=False)
    tc = SAE(cfg)
    ks = mx.random.split(mx.random.key(seed), 5)
    tc.b_enc = 0.1 * mx.random.normal(tc.b_enc.shape, key=ks[0])
    tc.b_dec = 0.1 * mx.random.normal(tc.b_dec.shape, key=ks[1])
    if skip:
        tc.W_skip = 0.1 * mx.random.normal(tc.W_skip.shape, key=ks[2])
    if arch == "jumprelu":
        tc.threshold = 0.05 * mx.abs(mx.random.normal(tc.threshold.shape, key=ks[3]))
    mx.eval(tc.parameters())
    return tc


@pytest.mark.parametrize("arch,skip", [("relu", False), ("relu", True), ("topk", False), ("jumprelu", True)])
def test_transcoder_spliced_replaces_the_mlp_output(smodel, arch, skip):
    d = smodel.cfg.d_model
    tc = _transcoder(d, arch, skip)
    assert tc.cfg.is_transcoder and tc.d_out == d
    toks = smodel.to_tokens("Once upon a time there was a little girl")
    logits, clean = smodel.run_with_cache(toks, names_filter=[IN, OUT])
    name = smodel.add_sae(tc)
    assert name == OUT and OUT + ".hook_sae_acts_post" in smodel.hook_dict
    try:
        out_logits, c = smodel.run_with_cache(toks, names_filter=[IN, OUT, OUT + ".hook_sae_acts_post"])
        # the MLP output is the transcoder's prediction from the MLP input of the same run
        assert_close(c[OUT], tc(c[IN]), 1e-5)
        assert_close(c[OUT + ".hook_sae_acts_post"], tc.encode(c[IN]), 1e-5)
        assert float(mx.abs(out_logits - logits).max()) > 1e-3
    finally:
        smodel.reset_saes()
    # with the error term the model is unchanged, and a latent edit moves the output by its decoder row
    with smodel.saes([tc], use_error_term=True):
        same = smodel(toks)
        f = tc.encode(clean[IN])
        j = int(mx.argmax(f[0, -1]).item())

        def zero(act, hook):
            return act * (mx.arange(act.shape[-1]) != j)

        with smodel.hooks([(OUT + ".hook_sae_acts_post", zero)]):
            _, edited = smodel.run_with_cache(toks, names_filter=[OUT, IN])
    assert np.array_equal(np.array(same), np.array(logits))
    # (at layer 1's last position, before any later change reaches it) the output moved by -f_j * W_dec[j]
    moved = edited[OUT][0, -1] - clean[OUT][0, -1]
    assert_close(moved, -f[0, -1, j] * tc.W_dec[j], 1e-4)
    assert not smodel._spliced


def test_transcoder_attach_checks(smodel):
    d = smodel.cfg.d_model
    tc = _transcoder(d)
    wide = SAE(SAEConfig(d_in=d, d_sae=32, d_out=d + 1, apply_b_dec_to_input=False, hook_name=IN, hook_name_out=OUT))
    with pytest.raises(ValueError, match="writes d_out"):
        smodel.add_sae(wide)
    backwards = SAE(tc.cfg.replace(hook_name="blocks.2.hook_resid_pre"))
    with pytest.raises(ValueError, match="later in the forward pass"):
        smodel.add_sae(backwards)
    assert not smodel._spliced
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        SAEConfig(d_in=d, hook_name=IN, hook_name_out=OUT)
    with pytest.raises(ValueError, match="step\\(x, target\\)"):
        SAETrainer(tc.cfg).step(mx.zeros((4, d)))
    from hooked_mlx.sae import evaluate_reconstruction, export_sparsify

    with pytest.raises(ValueError, match="targets="):
        evaluate_reconstruction(tc, mx.zeros((4, d)))
    with pytest.raises(ValueError, match="transcoder"):
        export_sparsify(tc, "/nonexistent/never-written")


@pytest.mark.parametrize("arch,skip", [("relu", False), ("relu", True), ("jumprelu", False), ("jumprelu", True)])
def test_transcoder_files_round_trip(tmp_path, arch, skip):
    tc = _transcoder(16, arch, skip, seed=3)
    x = mx.random.normal((5, 16), key=mx.random.key(9))
    want = np.array(tc(x))
    native = load_sae(save_sae(tc, str(tmp_path / "native")))
    assert native.cfg.hook_name_out == OUT and native.cfg.skip_connection == skip
    assert np.array_equal(np.array(native(x)), want)
    export_saelens(tc, str(tmp_path / "sl"))
    back = load_saelens(str(tmp_path / "sl"))
    assert back.cfg.hook_name_out == OUT and back.cfg.is_transcoder
    assert_close(back(x), want, 1e-6)


def test_transcoder_trains_on_the_mlp_and_splices(stories_path, corpus_docs):
    """A TopK skip transcoder trained by the engine on stories260K's layer-1 MLP (ln2.hook_normalized ->
    hook_mlp_out), streamed from the model (both hooks from one forward): it predicts the MLP output of held-out
    text far better than its mean, and spliced in it replaces the MLP."""
    from hooked_mlx.sae import ActivationStore, train_saes
    from hooked_mlx.sae import metrics as M

    model = HookedSAETransformer.from_pretrained(stories_path)
    batch = 512
    cfg = SAEConfig(architecture="topk", hook_name=IN, hook_name_out=OUT, skip_connection=True,
                    apply_b_dec_to_input=False, expansion_factor=8, k=16, lr=4e-3, lr_warmup_steps=20,
                    train_batch_size_tokens=batch, shuffle_buffer_tokens=2 * batch, training_tokens=400 * batch,
                    context_size=64, log_every_steps=100)
    source = ActivationStore(model, [IN, OUT], corpus_docs[:300], cfg)
    result = train_saes(cfg, source, progress=False)
    tc = result[IN]
    assert tc.cfg.is_transcoder and tc.cfg.d_out == 64 and "W_skip" in tc
    first, last = result.history[0][2][M.FVU], result.history[-1][2][M.FVU]
    toks = model.to_tokens(corpus_docs[350:354], padding_side="right")[:, :64]
    _, c = model.run_with_cache(toks, names_filter=[IN, OUT])
    x, y = c[IN].reshape(-1, 64), c[OUT].reshape(-1, 64)
    pred = tc(x)
    fvu = float(mx.sum(mx.square(pred - y)) / mx.sum(mx.square(y - y.mean(axis=0))))
    from hooked_mlx.sae import evaluate_reconstruction

    assert evaluate_reconstruction(tc, x, targets=y)[M.FVU] == pytest.approx(fvu, rel=1e-4)
    print(f"\ntranscoder {IN} -> {OUT}: train FVU {first:.3f} -> {last:.3f}, held-out FVU {fvu:.3f}")
    assert last < first and fvu < 0.35
    # spliced in: the MLP output is the trained transcoder's prediction
    with model.saes([tc]):
        _, s = model.run_with_cache(toks, names_filter=[IN, OUT])
    assert_close(s[OUT], tc(s[IN]), 1e-5)
    from hooked_mlx.sae import evaluate_model

    r = evaluate_model(model, tc, corpus_docs[350:354])
    print(f"CE clean {r[M.CE_LOSS_CLEAN]:.3f}, with the transcoder {r[M.CE_LOSS_SAE]:.3f}, MLP zeroed "
          f"{r[M.CE_LOSS_ZERO_ABLATION]:.3f}: recovered {r[M.CE_LOSS_RECOVERED]:.3f}")
    assert r[M.CE_LOSS_RECOVERED] > 0.5


@pytest.mark.parametrize("arch,d_out", [("topk", 16), ("topk", 24), ("relu", 16), ("jumprelu", 16),
                                        ("batchtopk", 16)])
def test_transcoder_default_kernels_track_the_reference(arch, d_out):
    """The trainer's default path (the device's fused ops; the fully fused TopK step when d_out == d_in) and the
    pure-MLX reference take the same steps on (input, target) pairs: parameters within 2e-4 of their scale
    after 30 steps, skip term included."""
    d_in, B = 24, 128
    cfg = SAEConfig(architecture=arch, d_in=d_in, d_out=d_out, d_sae=96, k=8, hook_name=IN, hook_name_out=OUT,
                    skip_connection=True, apply_b_dec_to_input=False, lr=2e-3, train_batch_size_tokens=B,
                    normalize_activations="none", b_dec_init="mean", dead_tokens_window=10 * B)
    ks = mx.random.split(mx.random.key(4), 3)
    M1 = mx.random.normal((d_in, d_out), key=ks[0]) / d_in**0.5
    xs = [mx.random.normal((B, d_in), key=k) for k in mx.random.split(ks[1], 4)]
    ys = [mx.tanh(x @ M1) + 0.1 * x[:, :d_out] for x in xs]
    params = {}
    for kernels in ("reference", None):
        t = SAETrainer(cfg) if kernels is None else SAETrainer(cfg, kernels=kernels)
        fvu = []
        for i in range(30):
            t.step(xs[i % 4], ys[i % 4])
            mx.eval(t.state_arrays())
            if i in (4, 29):
                fvu.append(t.read_metrics()["fvu"])  # (the mean since the last read)
        assert fvu[1] < fvu[0], (arch, kernels, fvu)
        params[kernels] = {k: np.array(v) for k, v in t.finalize().parameters().items()}
    for k, ref in params["reference"].items():
        assert_close(params[None][k], ref, 2e-4, err_msg=f"{arch}: {k}")


def test_train_transcoders_command(stories_path, corpus_path, tmp_path, capsys):
    """`hooked-mlx train-transcoders`: the output hook inferred from the MLP input, a skip transcoder trained
    from the model's stream, saved (native + SAELens), evaluated against its targets and spliced in."""
    from hooked_mlx.cli import main

    out = tmp_path / "tc"
    held = tmp_path / "held.txt"
    held.write_text("\n\n".join(corpus_path.read_text().split("\n\n")[-6:]))
    rc = main(["train-transcoders", str(stories_path), "--hook", IN, "--skip-connection", "--data", str(corpus_path),
               "--out", str(out), "--arch", "relu", "--l1-coefficient", "0.5", "--expansion", "4", "--tokens", "20480",
               "--train-batch-size-tokens", "256", "--shuffle-buffer-tokens", "512", "--context-size", "64",
               "--lr-warmup-steps", "5", "--export", "saelens", "--eval-data", str(held), "--eval-docs", "4",
               "--quiet"])
    assert rc == 0
    stdout = capsys.readouterr().out
    report = json.loads(stdout[stdout.index("{"):])
    tc = load_sae(str(out))
    assert tc.cfg.is_transcoder and tc.cfg.hook_name == IN and tc.cfg.hook_name_out == OUT and "W_skip" in tc
    sl = load_saelens(str(out / "saelens"))
    assert sl.cfg.hook_name_out == OUT
    x = mx.random.normal((6, 64), key=mx.random.key(2))
    assert_close(sl(x), tc(x), 1e-5)
    ev = report[IN]["eval"]
    assert 0 < ev["fvu"] < 1.0 and ev["ce_loss_recovered"] > 0.0
    for extra, match in ((["--hook", "blocks.1.hook_resid_pre"], "--hook-out"),
                         (["--hook", IN, "--arch", "topk", "--export", "saelens"], "no topk transcoder")):
        assert main(["train-transcoders", str(stories_path), *extra, "--data", str(corpus_path), "--out",
                     str(tmp_path / "x"), "--quiet"]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_skip_transcoder_input_edit_reaches_the_skip_term(smodel):
    """With the error term, an edit of the transcoder's input (hook_sae_input) moves the output by the change in
    its whole prediction, skip term included: target + tc(h) - tc(x)."""
    tc = _transcoder(smodel.cfg.d_model, "relu", skip=True, seed=5)
    toks = smodel.to_tokens("Once upon a time there was a little girl")
    _, clean = smodel.run_with_cache(toks, names_filter=[IN, OUT])
    shift = 0.3 * mx.random.normal((smodel.cfg.d_model,), key=mx.random.key(6))
    with smodel.saes([tc], use_error_term=True):
        with smodel.hooks([(OUT + ".hook_sae_input", lambda act, hook: act + shift)]):
            _, c = smodel.run_with_cache(toks, names_filter=[IN, OUT])
    x = clean[IN]
    assert_close(c[OUT], clean[OUT] + tc(x + shift) - tc(x), 1e-5)
