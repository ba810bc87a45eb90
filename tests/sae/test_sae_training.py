"""Training on synthetic sparse activations: every architecture learns, the mechanics (Adam with bias
correction, LR schedule, unit-norm decoder, b_dec init, dead latents, AuxK, ghost grads, non-finite
loss, checkpoints and exact resume) do what sae-algorithms.md sections 2 and 4 say."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hooked_mlx.sae import SAEConfig, SAETrainer
from hooked_mlx.sae import metrics as M
from hooked_mlx.sae.store import ArraySource
from hooked_mlx.sae.training import (
    CHECKPOINT_FILE,
    NonFiniteLossError,
    geometric_median,
    load_checkpoint,
    lr_schedule,
    train_saes,
)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from sae_fixtures import make_sparse_data
from tolerance import assert_close

B = 512


def _cfg(arch, **kw):
    base = dict(architecture=arch, hook_name="h", d_sae=256, k=4, lr=3e-3, lr_warmup_steps=10,
                train_batch_size_tokens=B, shuffle_buffer_tokens=B, training_tokens=200 * B, log_every_steps=50,
                norm_estimation_tokens=4 * B)
    base.update(kw)
    return SAEConfig(**base)


def _fvu(sae, x):
    xh = np.array(sae(mx.array(x)), dtype=np.float64)
    return ((xh - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def _l0(sae, x):
    return float((np.array(sae.encode(mx.array(x))) != 0).sum(-1).mean())


@pytest.mark.parametrize(
    "arch, kw, max_fvu, l0_range",
    [
        ("topk", {"k": 8}, 0.3, (8, 8)),
        ("batchtopk", {"k": 8, "batchtopk_threshold_lr": 0.1}, 0.36, (6.5, 9.5)),
        ("relu", {"l1_coefficient": 0.3, "sparsity_warmup_steps": 50}, 0.1, (1, 120)),
        ("jumprelu", {"l0_coefficient": 0.05, "sparsity_warmup_steps": 50}, 0.1, (1, 60)),
    ],
)
def test_each_architecture_learns(sparse_data, arch, kw, max_fvu, l0_range):
    train, held = sparse_data[:16000], sparse_data[16000:]
    res = train_saes(_cfg(arch, **kw), ArraySource({"h": train}, B, seed=1), progress=False)
    sae = res["h"]
    hist = [m for _, _, m in res.history]
    assert hist[-1][M.LOSS] < hist[0][M.LOSS]
    fvu, l0 = _fvu(sae, held), _l0(sae, held)
    assert fvu < max_fvu, (arch, fvu, l0)
    assert l0_range[0] <= l0 <= l0_range[1], (arch, fvu, l0)
    for key in M.TRAIN_KEYS:
        assert np.isfinite(hist[-1][key]), key
    assert hist[-1][M.EXPLAINED_VARIANCE] == pytest.approx(1 - hist[-1][M.FVU], abs=1e-6)
    if arch == "batchtopk":
        assert hist[-1][M.THRESHOLD] > 0
        np.testing.assert_allclose(np.array(sae.threshold), np.array(sae.threshold)[0])  # one global theta


def test_sparsity_coefficient_controls_l0(sparse_data):
    l0s = []
    for coef in (0.01, 1.0):
        res = train_saes(_cfg("relu", l1_coefficient=coef, training_tokens=120 * B), ArraySource({"h": sparse_data}, B),
                         progress=False)
        l0s.append(_l0(res["h"], sparse_data[:2000]))
    assert l0s[1] < 0.5 * l0s[0], l0s


def test_optimizer_schedule_and_unit_norm_decoder(sparse_data):
    cfg = _cfg("topk", lr_warmup_steps=10, lr_schedule="cosine", lr_end_factor=0.1, training_tokens=40 * B,
               log_every_steps=1)
    sched = lr_schedule(cfg)
    assert float(sched(mx.array(0))) == 0.0
    assert float(sched(mx.array(5))) == pytest.approx(cfg.lr / 2, rel=1e-5)
    assert float(sched(mx.array(10))) == pytest.approx(cfg.lr, rel=1e-5)
    assert float(sched(mx.array(40))) == pytest.approx(cfg.lr * cfg.lr_end_factor, rel=1e-4)
    lin = lr_schedule(cfg.replace(lr_schedule="linear"))
    assert float(lin(mx.array(25))) == pytest.approx(cfg.lr - (cfg.lr - cfg.lr / 10) * 15 / 30, rel=1e-5)
    res = train_saes(cfg, ArraySource({"h": sparse_data}, B), progress=False)
    t = res.trainers[0]
    assert t.optimizer.bias_correction is True  # mlx defaults to False
    lrs = [m[M.LR] for _, _, m in res.history]
    assert lrs[0] == pytest.approx(0.0, abs=1e-12) and lrs[9] == pytest.approx(cfg.lr * 0.9, rel=1e-4)
    # unit-norm decoder rows during training (in the trainer's normalised units)
    assert_close(np.array(mx.linalg.norm(t.sae.W_dec, axis=-1)), 1.0, tol=1e-5)


def test_b_dec_init_is_geometric_median_of_first_batch(sparse_data):
    x = mx.array(sparse_data[:B])
    gm = np.array(geometric_median(x), dtype=np.float64)
    xs = sparse_data[:B].astype(np.float64)

    def cost(m):
        return np.linalg.norm(xs - m, axis=1).sum()

    assert cost(gm) < cost(xs.mean(0))
    for _ in range(20):  # no small perturbation improves it
        d = np.random.default_rng(_).normal(size=gm.shape) * 1e-2
        assert cost(gm) <= cost(gm + d) + 1e-6
    cfg = _cfg("topk", d_in=32, normalize_activations="none")
    t = SAETrainer(cfg)
    t.initialize(x, 1.0)
    assert_close(np.array(t.sae.b_dec), gm, tol=1e-5)
    t2 = SAETrainer(cfg.replace(b_dec_init="mean"))
    t2.initialize(x, 2.0)
    assert_close(np.array(t2.sae.b_dec), 2.0 * sparse_data[:B].mean(0), tol=1e-5)


def test_input_normalisation_is_folded(sparse_data):
    """Trained on x*s with s = sqrt(d)/E||x||; the returned SAE takes raw x (identical to trainer SAE on x*s)."""
    data = sparse_data * 50.0
    res = train_saes(_cfg("topk", training_tokens=20 * B), ArraySource({"h": data}, B), progress=False)
    t = res.trainers[0]
    s = t.input_scale
    x = data[:256]
    expect = np.sqrt(32) / np.linalg.norm(data[: 4 * B], axis=1).mean()
    assert abs(s / expect - 1) < 0.05
    np.testing.assert_allclose(np.array(res["h"](mx.array(x))), np.array(t.sae(mx.array(x * s))) / s, rtol=1e-3,
                               atol=1e-3)


def _dead_setup(arch, **kw):
    """An SAE whose last 64 latents cannot fire (b_enc = -5) and a dead window of 2 batches."""
    cfg = _cfg(arch, d_in=32, dead_tokens_window=2 * B, normalize_activations="none", lr_warmup_steps=0, **kw)
    t = SAETrainer(cfg)
    data = mx.array(make_sparse_data(8 * B, seed=3))
    t.initialize(data[:B], 1.0)
    t.sae.b_enc = mx.concatenate([mx.zeros((192,)), mx.full((64,), -5.0)])
    t.optimizer.init(t.sae.trainable_parameters())
    t._build()
    w0 = np.array(t.sae.W_enc)
    for i in range(6):
        t.step(data[i * B:(i + 1) * B])
    m = t.read_metrics()
    return t, m, w0


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_trains_dead_latents(arch):
    t, m, w0 = _dead_setup(arch)
    assert m[M.DEAD_FRACTION] > 0.1  # averaged over 6 steps; the 64 blocked latents die after 2
    assert m[M.AUX_LOSS] > 0
    moved = np.abs(np.array(t.sae.W_enc)[:, 192:] - w0[:, 192:]).max()
    assert moved > 1e-4
    t0, m0, w00 = _dead_setup(arch, aux_k_coefficient=0.0)
    assert m0[M.AUX_LOSS] == 0
    assert np.abs(np.array(t0.sae.W_enc)[:, 192:] - w00[:, 192:]).max() == 0  # no gradient reaches them


def test_ghost_grads_train_dead_relu_latents():
    t, m, w0 = _dead_setup("relu", ghost_grads=True)
    assert m[M.DEAD_FRACTION] > 0.1 and m[M.AUX_LOSS] > 0
    assert np.abs(np.array(t.sae.W_enc)[:, 192:] - w0[:, 192:]).max() > 1e-4
    t0, m0, w00 = _dead_setup("relu", ghost_grads=False)
    assert m0[M.AUX_LOSS] == 0
    assert np.abs(np.array(t0.sae.W_enc)[:, 192:] - w00[:, 192:]).max() == 0


def test_non_finite_loss_names_step_and_restores(sparse_data):
    data = sparse_data[: 12 * B].copy()
    src = ArraySource({"h": data}, B, seed=0)
    batches = [src.next_batch() for _ in range(12)]
    batches[7]["h"] = batches[7]["h"] * float("nan")

    class Src:
        hook_names = ["h"]

        def __init__(self):
            self.i = 0

        def d_in(self, h):
            return 32

        def describe(self):
            return "test batches"

        def next_batch(self):
            self.i += 1
            return batches[(self.i - 1) % 12]

    cfg = _cfg("topk", normalize_activations="none", log_every_steps=5, training_tokens=12 * B)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step 7 .*the one from before step 7 "
                                                 r".*learning rate"):
        train_saes(cfg, Src(), progress=False)


def _train_source(data):
    return ArraySource({"h": data}, B, seed=5)


def test_checkpoint_resume_is_exact_in_process(sparse_data, tmp_path):
    cfg = _cfg("batchtopk", training_tokens=30 * B, checkpoint_every_steps=10, log_every_steps=5)
    full = train_saes(cfg, _train_source(sparse_data), progress=False)

    class Stop(Exception):
        pass

    def stop_at(step, mets):
        if step == 15:
            raise Stop

    with pytest.raises(Stop):
        train_saes(cfg, _train_source(sparse_data), checkpoint_path=str(tmp_path), callback=stop_at, progress=False)
    _, meta = load_checkpoint(str(tmp_path))
    assert meta["step"] == 10
    resumed = train_saes(cfg, _train_source(sparse_data), checkpoint_path=str(tmp_path), resume=True,
                         progress=False)
    for (k, a), (_, b) in zip(tree_flatten(full["h"].parameters()), tree_flatten(resumed["h"].parameters())):
        assert np.array_equal(np.array(a), np.array(b)), k
    # a resumed run refuses a changed config
    with pytest.raises(ValueError, match="configs differ"):
        train_saes(cfg.replace(lr=1e-3), _train_source(sparse_data), checkpoint_path=str(tmp_path), resume=True,
                   progress=False)


SCRIPT = r"""
import sys, time
import hooked_mlx
import numpy as np
sys.path.insert(0, {tests!r})
from sae_fixtures import make_sparse_data
from hooked_mlx.sae import SAEConfig, save_sae
from hooked_mlx.sae.store import ArraySource
from hooked_mlx.sae.training import train_saes
cfg = SAEConfig(**{cfg!r})
slow = sys.argv[1] == "slow"
cb = (lambda step, m: time.sleep(0.15)) if slow else None
res = train_saes(cfg, ArraySource({{"h": make_sparse_data()}}, cfg.train_batch_size_tokens, seed=5),
                 checkpoint_path=sys.argv[2], resume=True, callback=cb, progress=False)
save_sae(res["h"], sys.argv[3])
"""


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    cfg = _cfg("topk", training_tokens=40 * B, checkpoint_every_steps=4, log_every_steps=1).to_dict()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), cfg=cfg))
    env = dict(os.environ, MLX_ENABLE_TF32="0")
    ck = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, str(script), "slow", str(ck), str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1800  # only stops a hang: a loaded machine may take minutes to reach step 8
    step = 0
    while time.time() < deadline and proc.poll() is None:
        f = ck / CHECKPOINT_FILE
        if f.exists():
            try:
                step = load_checkpoint(str(ck))[1]["step"]
            except Exception:
                step = 0
            if step >= 8:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(str(ck))[1]["step"]
    assert 8 <= killed_at < 40
    r = subprocess.run([sys.executable, str(script), "fast", str(ck), str(tmp_path / "resumed")], env=env,
                       capture_output=True, text=True, timeout=1800)  # only stops a hang
    assert r.returncode == 0, r.stderr
    assert f"Resuming from {ck / CHECKPOINT_FILE} at step {killed_at}" in r.stderr
    r = subprocess.run([sys.executable, str(script), "fast", str(tmp_path / "ck2"), str(tmp_path / "full")], env=env,
                       capture_output=True, text=True, timeout=1800)  # only stops a hang
    assert r.returncode == 0, r.stderr
    from safetensors.numpy import load_file

    a = load_file(str(tmp_path / "resumed" / "sae.safetensors"))
    b = load_file(str(tmp_path / "full" / "sae.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert json.loads((tmp_path / "full" / "cfg.json").read_text())["architecture"] == "topk"


def test_several_saes_from_one_source(sparse_data):
    data2 = sparse_data[:, ::-1].copy() * 2
    src = ArraySource({"a": sparse_data, "b": data2}, B, seed=0)
    cfgs = [_cfg("topk", hook_name="a", training_tokens=20 * B), _cfg("relu", hook_name="b", training_tokens=20 * B)]
    res = train_saes(cfgs, src, progress=False)
    assert set(res) == {"a", "b"}
    assert res["a"].cfg.architecture == "topk" and res["b"].cfg.architecture == "relu"
    assert {h for _, h, _ in res.history} == {"a", "b"}
    with pytest.raises(ValueError, match="must share train_batch_size_tokens"):
        train_saes([cfgs[0], cfgs[1].replace(train_batch_size_tokens=256, shuffle_buffer_tokens=256)], src,
                   progress=False)


def test_wandb_missing_gives_clear_error(sparse_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        train_saes(_cfg("topk", wandb_project="p", training_tokens=2 * B), ArraySource({"h": sparse_data}, B),
                   progress=False)


@pytest.mark.parametrize("arch, kernels", [("jumprelu", "auto"), ("topk", "auto"), ("topk", "reference")])
def test_trainer_keeps_the_last_good_state_after_nan(sparse_data, arch, kernels):
    """Exact on the default (fused) path too: there the skip is folded into the Adam passes."""
    cfg = _cfg(arch, d_in=32, normalize_activations="none")
    t = SAETrainer(cfg, kernels=kernels)
    x = mx.array(sparse_data[:B])
    t.initialize(x, 1.0)
    for _ in range(3):
        t.step(x)
    t.read_metrics()
    t.step(x)
    mx.eval(t.state_arrays())
    good = {k: np.array(v) for k, v in tree_flatten(t.sae.parameters())}
    good_opt = {k: np.array(v) for k, v in tree_flatten(t.optimizer.state)}
    t.step(x * float("inf"))  # step 4 (0-based) is bad; the updates of steps 4 and 5 are skipped
    t.step(x)
    with pytest.raises(NonFiniteLossError, match="step 4 "):
        t.read_metrics()
    for k, v in tree_flatten(t.sae.parameters()):
        assert np.array_equal(np.array(v), good[k]), k
    for k, v in tree_flatten(t.optimizer.state):
        assert np.array_equal(np.array(v), good_opt[k]), k
    assert t.step_count == 4
    t.step(x)  # training can go on from the kept state
    assert np.isfinite(t.read_metrics()[M.LOSS])
    assert t.step_count == 5


def test_progress_bar_and_start_line(sparse_data, capsys):
    train_saes(_cfg("topk", training_tokens=10 * B, log_every_steps=5), ArraySource({"h": sparse_data}, B),
               progress=True)
    err = capsys.readouterr().err
    assert "d_in=32" in err and "d_sae=256" in err and "in-memory arrays" in err  # d_in and data mode at start
    for key in ("tok/s", "loss", "L0", "FVU", "dead%"):
        assert key in err


def test_ctrl_c_between_steps_writes_a_resumable_checkpoint(sparse_data, tmp_path):
    cfg = _cfg("topk", training_tokens=20 * B, checkpoint_every_steps=100, log_every_steps=3)
    full = train_saes(cfg, _train_source(sparse_data), progress=False)

    def interrupt(step, mets):
        if step == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_saes(cfg, _train_source(sparse_data), checkpoint_path=str(tmp_path), callback=interrupt, progress=False)
    assert load_checkpoint(str(tmp_path))[1]["step"] == 9
    resumed = train_saes(cfg, _train_source(sparse_data), checkpoint_path=str(tmp_path), resume=True, progress=False)
    for (k, a), (_, b) in zip(tree_flatten(full["h"].parameters()), tree_flatten(resumed["h"].parameters())):
        assert np.array_equal(np.array(a), np.array(b)), k


def test_sparsity_warmup_ramps_the_coefficient(sparse_data):
    """JumpReLU: sparsity_loss = lambda * min(1, (step+1)/warmup) * L0 at every step."""
    cfg = _cfg("jumprelu", l0_coefficient=0.2, sparsity_warmup_steps=8, training_tokens=12 * B, log_every_steps=1)
    res = train_saes(cfg, ArraySource({"h": sparse_data}, B), progress=False)
    for step, _, m in res.history:
        expect = cfg.l0_coefficient * min(1.0, step / cfg.sparsity_warmup_steps) * m[M.L0]
        assert m[M.SPARSITY_LOSS] == pytest.approx(expect, rel=1e-4), step
