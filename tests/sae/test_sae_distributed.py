"""Data-parallel SAE training and sharded harvesting: 2 local processes on mx.distributed's ring backend
(launched with ``mlx.launch``, as users do) against one process on the same global batches."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from hooked_mlx.cli import main
from hooked_mlx.sae import SAEConfig, ShardSource, harvest, load_sae
from hooked_mlx.sae.distributed import World, check_resume_world
import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: only stops a hang (a rank waiting forever on a collective), never a slow run: a loaded 2-core machine takes
#: minutes where an idle one takes seconds
HANG_TIMEOUT_S = 1800


def launch(args: list[str], n: int = 2, timeout: float = HANG_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``sys.executable args...`` as n ranks of the ring backend; fail with both outputs if a rank fails."""
    if not mx.distributed.is_available():
        pytest.skip("mx.distributed has no backend in this MLX build (is_available() is False)")
    if not os.path.exists(LAUNCH):
        pytest.skip(f"mlx.launch not found (looked on PATH and at {LAUNCH})")
    cmd = [LAUNCH, "--backend", "ring", "-n", str(n), "--starting-port", str(_free_port()), "--",
           sys.executable, *args]
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} hung (no exit after {timeout} s):\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_two_ranks_train_like_one_process_on_the_same_global_batches(tmp_path, capsys):
    sys.path.insert(0, str(HERE))
    import dist_worker as W

    ck = tmp_path / "ck"
    launch([str(HERE / "dist_worker.py"), str(tmp_path), str(ck)])
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert int(r0["size"]) == 2 and int(r1["size"]) == 2
    single = W.params(W.train())
    assert set(single) == set(r0.files) - {"size"}
    for k, ref in single.items():
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=f"{k} differs between the ranks")
        if k.startswith("metric/"):  # global metrics (FVU from global sums: another summation order)
            np.testing.assert_allclose(r0[k], ref, rtol=1e-4, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_allclose(r0[k], ref, rtol=0, atol=1e-5, err_msg=k)
    # the run really exercised the cross-rank paths: AuxK on dead latents, a BatchTopK threshold, sparsity
    h0, h1 = W.HOOKS[0], W.HOOKS[1]
    assert single[f"metric/{W.STEPS}/{h0}/aux_loss"] > 0 and single[f"metric/{W.STEPS}/{h1}/aux_loss"] > 0
    assert single[f"{h1}/theta"] > 0 and single[f"metric/{W.STEPS}/{h0}/l0"] == pytest.approx(4.0)
    # rank 0 wrote the checkpoint; one process resumes it, says the rank count changed, and keeps the state
    meta = json.loads(mx.load(str(ck / "checkpoint.safetensors"), return_metadata=True)[1]["hooked_mlx"])
    assert meta["extra"]["world_size"] == 2 and meta["step"] == W.STEPS
    capsys.readouterr()
    resumed = W.train(checkpoint_path=str(ck), resume=True)
    err = capsys.readouterr().err
    assert "written by 2 rank(s); this run has 1" in err
    for h, t in zip(W.HOOKS, resumed.trainers):
        np.testing.assert_array_equal(np.array(t.sae.W_dec), r0[f"{h}/W_dec"])


def test_two_ranks_train_a_cross_layer_transcoder_like_one_process(tmp_path):
    """Data-parallel CLT training (hooked_mlx.circuits.clt_training): TopK and JumpReLU CLTs on two ranks equal
    the single-process run on the same global batches (global variances in the loss, summed gradients); rank 0's
    checkpoint resumes in one process to the same parameters."""
    sys.path.insert(0, str(HERE))
    import clt_dist_worker as C

    ck = tmp_path / "ck"
    launch([str(HERE / "clt_dist_worker.py"), str(tmp_path), str(ck)])
    for arch in ("topk", "jumprelu"):
        r0, r1 = np.load(tmp_path / f"clt_{arch}_rank0.npz"), np.load(tmp_path / f"clt_{arch}_rank1.npz")
        assert int(r0["size"]) == 2
        single = C.params(C.train(arch=arch))
        assert set(single) == set(r0.files) - {"size"}
        for k, ref in single.items():
            np.testing.assert_array_equal(r0[k], r1[k], err_msg=f"{arch} {k} differs between the ranks")
            np.testing.assert_allclose(r0[k], ref, rtol=0, atol=1e-5 * max(1.0, float(np.abs(ref).max())),
                                       err_msg=f"{arch} {k}")
        assert (Path(f"{ck}_{arch}") / "clt_checkpoint.safetensors").exists()
        if arch == "topk":  # the cross-rank AuxK path ran (global dead mask, global residual variances)
            aux: list[float] = []
            C.train(arch=arch, callback=lambda step, m, aux=aux: aux.append(m["aux_loss"]))
            assert max(aux) > 0
        resumed = C.params(C.train(checkpoint_path=f"{ck}_{arch}", resume=True, arch=arch))  # (at its last step)
        for k in single:
            np.testing.assert_array_equal(resumed[k], r0[k], err_msg=f"{arch} {k} after resuming")


def test_bfloat16_gradient_all_sum_tracks_the_float32_run(tmp_path):
    """``grad_reduce_dtype="bfloat16"`` (the GPU default, "auto") halves the bytes of the large all_sums; the
    ranks stay identical to each other and the run stays within bf16 rounding of the float32 one."""
    sys.path.insert(0, str(HERE))
    import dist_worker as W

    launch([str(HERE / "dist_worker.py"), str(tmp_path), "-", "bfloat16"])
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    single = W.params(W.train())
    worst = 0.0
    for h in W.HOOKS:
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            k = f"{h}/{name}"
            np.testing.assert_array_equal(r0[k], r1[k], err_msg=f"{k} differs between the ranks")
            err = float(np.max(np.abs(r0[k] - single[k])) / np.max(np.abs(single[k])))
            worst = max(worst, err)
            assert err < 2e-2, f"{k}: {err:.2e} relative to the float32 single-process run"
    print(f"bf16 all_sum: worst relative parameter difference to the float32 run {worst:.2e}")
    assert worst > 1e-4  # the gradients really travelled in bfloat16 (float32 stays within 1e-5: test above)


def test_two_ranks_stream_their_own_documents_and_resume_exactly(stories_path, corpus_path, tmp_path):
    launch([str(HERE / "dist_worker.py"), "--stream", str(stories_path), str(corpus_path), str(tmp_path)])
    r0, r1 = np.load(tmp_path / "stream_rank0.npz"), np.load(tmp_path / "stream_rank1.npz")
    np.testing.assert_array_equal(r0["full"], r1["full"])  # one model on every rank
    np.testing.assert_array_equal(r0["resumed"], r0["full"])  # per-rank stores restored from rank 0's file
    np.testing.assert_array_equal(r1["resumed"], r1["full"])
    tensors, meta = mx.load(str(tmp_path / "ck_cut" / "checkpoint.safetensors"), return_metadata=True)
    src = json.loads(meta["hooked_mlx"])["source"]
    assert src["kind"] == "per_rank" and len(src["ranks"]) == 2
    # the ranks streamed different documents: their shuffle buffers differ
    assert not np.array_equal(np.array(tensors["source.rank0.buffer0"]), np.array(tensors["source.rank1.buffer0"]))


def test_rank_slices_of_array_sources_make_up_the_global_batches(stories, corpus_docs):
    from hooked_mlx.sae import ActivationStore, ArraySource

    x = np.arange(600 * 3, dtype=np.float32).reshape(600, 3)
    whole = ArraySource({"h": x}, 96, seed=5)
    parts = [ArraySource({"h": x}, 96, seed=5) for _ in range(3)]
    for r, p in enumerate(parts):
        p.set_shard(r, 3)
        p.set_shard(r, 3)  # idempotent
    for _ in range(8):  # across an epoch boundary (600 // 96 = 6 batches per epoch)
        ref = np.array(whole.next_batch()["h"])
        got = np.concatenate([np.array(p.next_batch()["h"]) for p in parts])
        np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match="does not split evenly over 5 ranks"):
        ArraySource({"h": x}, 96).set_shard(0, 5)
    five = World(None)
    five.size = 5
    with pytest.raises(ValueError, match="does not split evenly over 5 ranks; use a multiple of 5"):
        five.local_rows(96)
    # a streaming store shard reads documents rank, rank + size, ...
    cfg = SAEConfig(train_batch_size_tokens=64, shuffle_buffer_tokens=64, context_size=32)
    st = ActivationStore(stories, "blocks.0.hook_resid_post", corpus_docs[:6], cfg)
    st.set_shard(1, 2)
    st.set_shard(1, 2)
    assert st.batch_size == 32 and list(st.contexts.corpus_fn()) == corpus_docs[1:6:2]


def test_streaming_resume_refuses_another_rank_count():
    meta = {"extra": {"world_size": 2}, "source": {"kind": "per_rank", "world_size": 2, "ranks": [{}, {}]}}
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\) and this run has 1.*mlx.launch -n 2"):
        check_resume_world(meta, object(), World(None), "ck/checkpoint.safetensors", sys.stderr)
    check_resume_world({"extra": {}}, object(), World(None), "ck", sys.stderr)  # 1 -> 1: nothing to say


def test_sharded_harvest_and_train_sae_cli_under_mlx_launch(stories, stories_path, corpus_path, corpus_docs,
                                                             tmp_path):
    hook = "blocks.1.hook_resid_post"
    acts = tmp_path / "acts"
    cli = ["-m", "hooked_mlx.cli"]
    proc = launch(cli + ["harvest", "--model", str(stories_path), "--hook", hook, "--data", str(corpus_path),
                         "--tokens", "3000", "--shard-tokens", "1000", "--context-size", "64", "--out", str(acts),
                         "--quiet"])
    assert proc.stdout.count("wrote 3,000 tokens") == 1  # rank 0 reports
    man = json.loads((acts / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["n_tokens"] == 3000
    files = [s["file"] for s in man["shards"]]
    assert files == ["shard_r000_00000.safetensors", "shard_r000_00001.safetensors",
                     "shard_r001_00000.safetensors", "shard_r001_00001.safetensors"]
    assert [s["n_tokens"] for s in man["shards"]] == [1000, 500, 1000, 500]
    # rank r ran the model on documents r, r+2, ...: its rows are a one-process harvest of those documents
    src = ShardSource(str(acts), batch_size=1)
    rows = np.concatenate([np.asarray(s) for s in src.segments[hook]])
    cfg = SAEConfig(context_size=64)
    for r in (0, 1):
        ref_dir = tmp_path / f"ref{r}"
        harvest(stories, hook, corpus_docs[r::2], str(ref_dir), 1500, cfg=cfg, progress=False)
        ref = np.concatenate([np.asarray(s) for s in ShardSource(str(ref_dir), 1).segments[hook]])
        np.testing.assert_array_equal(rows[1500 * r:1500 * (r + 1)], ref)
    # train-sae on the shards: 2 ranks (rank 0 saves and reports) == 1 process, same global batches
    train = ["train-sae", "--data", str(acts), "--arch", "topk", "--k", "4", "--expansion", "4",
             "--train-batch-size-tokens", "128", "--tokens", "1280", "--norm-estimation-tokens", "256",
             "--dead-tokens-window", "256", "--lr-warmup-steps", "2", "--eval-batches", "1", "--quiet"]
    proc = launch(cli + train + ["--out", str(tmp_path / "sae2")])
    assert proc.stdout.count('"eval"') == 1
    assert main(train + ["--out", str(tmp_path / "sae1")]) == 0
    two, one = load_sae(str(tmp_path / "sae2")), load_sae(str(tmp_path / "sae1"))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert_close(np.array(getattr(two, name)), np.array(getattr(one, name)), tol=1e-5)
