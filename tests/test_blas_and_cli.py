"""The Linux BLAS fix (results unchanged, warning on wrong import order) and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hooked_mlx import HookedTransformer, _blas
from hooked_mlx.cli import main
import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

ROOT = Path(__file__).resolve().parent.parent

LOGITS_SCRIPT = """
import sys, numpy as np
import hooked_mlx, mlx.core as mx
from hooked_mlx import HookedTransformer, _blas
m = HookedTransformer.from_pretrained(sys.argv[1])
a = mx.random.normal((257, 300), key=mx.random.key(0)); b = mx.random.normal((300, 129), key=mx.random.key(1))
np.save(sys.argv[2], np.array(m(m.to_tokens('Once upon a time, there was a little girl'))))
np.save(sys.argv[3], np.array(a @ b))
print("BLAS", _blas.LOADED)
"""


HANG_TIMEOUT_S = 1800  # only stops a hang; a loaded machine may take minutes


def _run(code, *args, env=None):
    """A fresh interpreter; these tests set the BLAS switch themselves (a suite run with HOOKED_MLX_NO_BLAS=1
    must not turn the fix off in the run that checks it is on)."""
    base = {k: v for k, v in os.environ.items() if k != "HOOKED_MLX_NO_BLAS"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env={**base, **(env or {})}, cwd=ROOT, timeout=HANG_TIMEOUT_S)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS fix applies to Linux only")
def test_blas_fix_loaded_and_results_unchanged(tmp_path, stories_path):
    fast = _run(LOGITS_SCRIPT, stories_path, tmp_path / "l1.npy", tmp_path / "m1.npy")
    slow = _run(LOGITS_SCRIPT, stories_path, tmp_path / "l2.npy", tmp_path / "m2.npy",
                env={"HOOKED_MLX_NO_BLAS": "1"})
    assert fast.returncode == 0 and slow.returncode == 0, fast.stderr + slow.stderr
    assert "BLAS None" in slow.stdout
    if not _blas.candidate_paths():
        pytest.skip("no optimised BLAS on this machine (install hooked-mlx[cpu])")
    assert "BLAS None" not in fast.stdout
    assert_close(np.load(tmp_path / "l1.npy"), np.load(tmp_path / "l2.npy"), tol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "m1.npy"), np.load(tmp_path / "m2.npy"), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS fix applies to Linux only")
def test_wrong_import_order_warns_with_the_fix():
    r = _run("import mlx.core\nimport hooked_mlx\n")
    assert r.returncode == 0
    if _blas.candidate_paths():
        assert "imported before hooked_mlx" in r.stderr and "LD_PRELOAD" in r.stderr
    r2 = _run("import mlx.core\nimport hooked_mlx\n", env={"HOOKED_MLX_NO_BLAS": "1"})
    assert "imported before" not in r2.stderr


def test_cli_convert_and_hooks(tmp_path, stories_path, capsys):
    out = tmp_path / "canon"
    assert main(["convert", str(stories_path), str(out)]) == 0
    text = capsys.readouterr().out
    assert "max |logit difference|" in text and "= 0" in text
    meta = json.loads((out / "config.json").read_text())
    assert meta["hooked_mlx_format"] == 1
    assert (out / "tokenizer.model").exists()
    m = HookedTransformer.from_pretrained(out)
    ref = HookedTransformer.from_pretrained(stories_path)
    toks = ref.to_tokens("Once upon a time")
    assert mx.abs(m(toks) - ref(toks)).max().item() == 0.0

    assert main(["hooks", str(out), "--filter", "blocks.1.attn.*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {l.split()[0]: l.split(None, 1)[1] for l in lines if l.startswith("blocks.")}
    assert table["blocks.1.attn.hook_pattern"].replace(" ", "").startswith("(1,8,")
    assert table["blocks.1.attn.hook_k"].replace(" ", "").endswith(",4,8)")
    assert len(table) == 9  # q, k, v, rot_q, rot_k, attn_scores, pattern, z, result
    assert main(["hooks", str(out), "--filter", "hook_resid_prex"]) == 2
    assert "Closest" in capsys.readouterr().err


def test_cli_convert_quantized_dtype(tmp_path, tiny_llama_path, capsys):
    out = tmp_path / "bf16"
    assert main(["convert", str(tiny_llama_path), str(out), "--dtype", "bfloat16"]) == 0
    assert mx.load(str(out / "model.safetensors"))["embed.weight"].dtype == mx.bfloat16
    assert HookedTransformer.from_pretrained(out, dtype="bfloat16").embed.weight.dtype == mx.bfloat16
    # on the CPU backend a half-precision checkpoint loads as float32 unless dtype= says otherwise
    want = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    assert HookedTransformer.from_pretrained(out).embed.weight.dtype == want
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
