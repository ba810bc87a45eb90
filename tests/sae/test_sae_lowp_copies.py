"""The trainer's low-precision parameter copies (the GPU back ends' bf16 W_enc and W_dec that the fused forward
reads), run on the CPU through a back end that computes like the GPU ones (bf16 encoder operand, bf16 decoder
rows, the fused update) with the reference ops.

The copies are derived state: written by the Adam passes, never checkpointed, rebuilt on load. A trainer that
keeps them must end bit-identical to one that casts the parameters in every step, on every update path."""

from __future__ import annotations

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
from hooked_mlx.sae import SAEConfig, SAETrainer
from hooked_mlx.sae.kernels import fused as FU
from hooked_mlx.sae.kernels import select as S
import mlx.core as mx
import numpy as np
import pytest
from sae_fixtures import make_sparse_data

B = 128


class _GpuLike(FU.ReferenceOps):
    """The reference ops with the GPU back ends' precision choices and update."""

    name = "cuda"
    matmul_dtype = mx.bfloat16
    decoder_dtype = mx.bfloat16
    lowp_backward = True
    fused_optimizer = True
    sparse_batchtopk = True


@pytest.fixture
def gpu_like(monkeypatch):
    monkeypatch.setattr(S, "_gpu_ops", lambda name: _GpuLike())
    monkeypatch.setattr(S, "_CHOSEN", {})
    monkeypatch.setenv("HOOKED_MLX_SAE_KERNELS", "cuda")
    assert FU.get_ops().name == "cuda"  # passed the self-check


def _cfg(arch):
    return SAEConfig(architecture=arch, hook_name="h", d_in=32, d_sae=256, k=8, lr=3e-3, lr_warmup_steps=3,
                     train_batch_size_tokens=B, training_tokens=12 * B, dead_tokens_window=3 * B,
                     normalize_activations="none", grad_clip_norm=0.05)


def _trainer(cfg, batches, copies: bool, low_memory: bool, steps: int):
    t = SAETrainer(cfg)
    if not copies:
        t._lowp_dtypes = {}  # the forward then casts the parameters in each step
    t.low_memory = low_memory
    t.initialize(batches[0])
    for x in batches[:steps]:
        t.step(x)
    mx.eval(t.state_arrays())
    return t


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("low_memory", [False, True])
def test_copies_equal_casting_every_step(gpu_like, arch, low_memory):
    data = make_sparse_data()
    batches = [mx.array(data[i * B:(i + 1) * B]) for i in range(12)]
    cfg = _cfg(arch)
    kept = _trainer(cfg, batches, True, low_memory, 12)
    cast = _trainer(cfg, batches, False, low_memory, 12)
    assert set(kept.lowp) == {"W_enc", "W_dec"} and cast.lowp == {}
    for name in ("W_enc", "W_dec"):
        # the copy is the current parameter, rounded (the Adam pass wrote it; 12 steps, AuxK on after step 3)
        assert kept.lowp[name].dtype == mx.bfloat16
        assert mx.array_equal(kept.lowp[name], getattr(kept.sae, name).astype(mx.bfloat16)).item(), name
    for name, a in kept.sae.parameters().items():
        assert mx.array_equal(a, cast.sae.parameters()[name]).item(), name
    assert kept.read_metrics() == cast.read_metrics()


def test_copies_are_not_checkpointed_and_are_rebuilt_on_load(gpu_like):
    data = make_sparse_data()
    batches = [mx.array(data[i * B:(i + 1) * B]) for i in range(8)]
    cfg = _cfg("topk")
    a = _trainer(cfg, batches, True, False, 4)
    tensors = a.tensors("t.")
    assert not any("lowp" in k for k in tensors) and len(tensors) == len(a.tensors("t."))
    b = SAETrainer(cfg)
    b.load_tensors(tensors, "t.", a.input_scale)
    for name in ("W_enc", "W_dec"):
        assert mx.array_equal(b.lowp[name], a.lowp[name]).item(), name
    for x in batches[4:]:
        a.step(x)
        b.step(x)
    mx.eval(a.state_arrays(), b.state_arrays())
    for name, p in a.sae.parameters().items():
        assert np.array_equal(np.array(p), np.array(b.sae.parameters()[name])), name


def test_forward_refuses_a_copy_of_the_wrong_shape(gpu_like):
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(size=(4, 8)).astype(np.float32))
    W_enc = mx.array(rng.normal(size=(8, 16)).astype(np.float32))
    W_dec = mx.array(rng.normal(size=(16, 8)).astype(np.float32))
    with pytest.raises(ValueError, match=r"W_dec_lowp has shape \(8, 16\).*expected \(16, 8\) in "):
        FU.topk_sae_forward(x, W_enc, mx.zeros((16,)), W_dec, mx.zeros((8,)), 2,
                            W_dec_lowp=W_enc.T.astype(mx.bfloat16).T)


def test_the_kept_copies_can_be_chosen(gpu_like, monkeypatch):
    """HOOKED_MLX_SAE_LOWP_COPIES=W_dec keeps only the decoder's copy (the encoder's operand is then cast in each
    step); the trainer still ends bit-identical to casting both in every step."""
    monkeypatch.setenv("HOOKED_MLX_SAE_LOWP_COPIES", "W_dec")
    data = make_sparse_data()
    batches = [mx.array(data[i * B:(i + 1) * B]) for i in range(6)]
    cfg = _cfg("topk")
    kept = _trainer(cfg, batches, True, False, 6)
    cast = _trainer(cfg, batches, False, False, 6)
    assert set(kept.lowp) == {"W_dec"}
    for name, a in kept.sae.parameters().items():
        assert mx.array_equal(a, cast.sae.parameters()[name]).item(), name


def test_an_unknown_copy_name_is_refused(gpu_like, monkeypatch):
    monkeypatch.setenv("HOOKED_MLX_SAE_LOWP_COPIES", "W_dec,W_skip")
    with pytest.raises(ValueError, match=r"HOOKED_MLX_SAE_LOWP_COPIES names \['W_skip'\]; expected .*W_enc, W_dec"):
        SAETrainer(_cfg("topk"))
