"""Feature dashboards and the attention viewer, rendered by a real browser (headless Debian chromium, no
network): the pages draw with no script error, show the tokens and values computed in Python, and a screenshot
is not blank. Also: the dashboard data (density, histogram, contexts) against a direct computation, the
Neuronpedia-style JSON, and the ``hooked-mlx dashboard`` command."""

from __future__ import annotations

import json
import os
import re

from hooked_mlx.sae import SAE, SAEConfig
from hooked_mlx.sae.analysis import _hook_acts, feature_stats
from hooked_mlx.sae.dashboard import feature_dashboard_data, write_dashboards
from hooked_mlx.viz import attention_data, render_attention_page
from hooked_mlx.viz.page import render_page
import mlx.core as mx
import numpy as np
import pytest
from browser import _assert_rendered, _browser, _dom, _not_blank, _parse
from sae_fixtures import CORPUS

FEATURES = [0, 5, 17]


@pytest.fixture(scope="module")
def sae(stories):
    cfg = SAEConfig(hook_name="blocks.2.hook_resid_post", d_in=stories.cfg.d_model, expansion_factor=4,
                    architecture="topk", k=8, seed=5)
    return SAE(cfg)


@pytest.fixture(scope="module")
def dash(stories, sae, tmp_path_factory):
    out = tmp_path_factory.mktemp("dash") / "site"
    write_dashboards(stories, sae, FEATURES, str(CORPUS), out, max_docs=40, n_examples=6)
    return out


def test_feature_stats_equal_a_direct_count(stories, sae):
    """Density and histogram over the corpus positions equal counting the encoded activations directly."""
    from hooked_mlx.sae.corpus import ContextBuilder, open_corpus

    stats = feature_stats(stories, sae, FEATURES, str(CORPUS), max_docs=16, bins=12)
    builder = ContextBuilder(open_corpus(str(CORPUS)), stories.tokenizer, sae.cfg.context_size,
                             bos=stories.bos_token_id, pad=getattr(stories, "pad_token_id", None),
                             prepend_bos=sae.cfg.prepend_bos, packing=False,
                             exclude_special=sae.cfg.exclude_special_tokens, cycle=False)
    toks, mask = builder.next_block(16)
    f = np.array(sae.encode(_hook_acts(stories, sae, mx.array(toks))))[np.array(mask)][:, FEATURES]
    assert stats.n_tokens == f.shape[0]
    for j in range(len(FEATURES)):
        v = f[:, j][f[:, j] > 0]
        assert stats.frac_nonzero[j] == pytest.approx(v.size / f.shape[0])
        assert stats.max_value[j] == pytest.approx(float(v.max()), rel=1e-6)
        assert stats.hist_counts[j] == np.histogram(v, bins=12, range=(0, v.max()))[0].tolist()
    assert any(x > 0 for x in stats.frac_nonzero)


def test_neuronpedia_json_and_the_files_written(dash, stories, sae):
    assert sorted(os.listdir(dash)) == ["feature_0.html", "feature_17.html", "feature_5.html", "index.html",
                                        "neuronpedia"]
    data = feature_dashboard_data(stories, sae, FEATURES, str(CORPUS), max_docs=40, n_examples=6)
    for f in FEATURES:
        rec = json.loads((dash / "neuronpedia" / f"{f}.json").read_text())
        assert rec == json.loads(json.dumps(data[f]))
        assert rec["index"] == f and rec["layer"] == "blocks.2.hook_resid_post"
        for a in rec["activations"]:
            assert a["maxValue"] == max(a["values"]) == a["values"][a["maxValueTokenIndex"]] > 0
        assert sum(rec["freq_hist_data_bar_heights"]) == round(rec["frac_nonzero"] * rec["n_tokens"])
        assert len(rec["pos_str"]) == 10 and rec["pos_values"] == sorted(rec["pos_values"], reverse=True)
    with pytest.raises(Exception, match="overwrite"):
        write_dashboards(stories, sae, FEATURES, str(CORPUS), dash, max_docs=4)


def test_feature_page_in_the_browser_shows_the_computed_tokens_and_values(dash):
    for f in FEATURES:
        rec = json.loads((dash / "neuronpedia" / f"{f}.json").read_text())
        run = _browser(f"file://{dash}/feature_{f}.html", "--dump-dom")
        dom = run.stdout
        _assert_rendered(dom)
        assert "Uncaught" not in run.stderr
        items = _parse(dom).items
        rows = [a for t, a, _ in items if t == "div" and "data-example" in a]
        assert len(rows) == len(rec["activations"])
        toks = [(a, s) for t, a, s in items if t == "span" and a.get("class") == "tok"]
        want = [(t, v) for ex in rec["activations"] for t, v in zip(ex["tokens"], ex["values"])]
        assert len(toks) == len(want)
        for (a, s), (t, v) in zip(toks, want):
            assert float(a["data-value"]) == pytest.approx(v, rel=1e-6, abs=1e-9)
            assert s == t.replace("\n", "\u21b5").replace("\t", "\u2192")
        assert sum(a.get("data-max") == "1" for a, _ in toks) == len(rows)
        bars = [int(a["data-count"]) for t, a, _ in items if t == "rect"]
        assert bars == rec["freq_hist_data_bar_heights"]
        pos = [float(a["data-value"]) for t, a, _ in items if t == "td" and "pos" in a.get("class", "")]
        assert pos == pytest.approx(rec["pos_values"], rel=1e-6)
    index = _dom(dash / "index.html")
    _assert_rendered(index)
    assert all(f"feature_{f}.html" in index for f in FEATURES)
    _browser(f"file://{dash}/feature_{FEATURES[0]}.html", "--window-size=1100,900",
             f"--screenshot={dash.parent / 'feature.png'}")
    _not_blank(dash.parent / "feature.png")


def test_attention_viewer_in_the_browser_shows_the_head_s_weights(stories, tmp_path):
    text = "Once upon a time there was a little girl named Lily."
    data = attention_data(stories, text)
    assert len(data["patterns"]) == stories.cfg.n_layers and len(data["patterns"][0]) == stories.cfg.n_heads
    _, cache = stories.run_with_cache(stories.to_tokens(text), names_filter="blocks.1.attn.hook_pattern")
    P = np.array(cache["blocks.1.attn.hook_pattern"][0, 2])
    page = tmp_path / "attention.html"
    page.write_text(render_attention_page(data))
    dom = _dom(page, "#layer=1&head=2&query=5")
    _assert_rendered(dom)
    spans = [(a, s) for t, a, s in _parse(dom).items if t == "span" and "data-pos" in a]
    assert [s for _, s in spans] == data["tokens"]
    w = [float(a["data-weight"]) for a, _ in spans]
    np.testing.assert_allclose(w[:6], P[5, :6], atol=2e-5)  # (rounded to 5 decimals in the page)
    assert w[6:] == [0.0] * (len(w) - 6) and sum(w) == pytest.approx(1.0, abs=1e-4)
    assert [a["data-query"] for a, _ in spans].index("1") == 5
    _browser(f"file://{page}#layer=1&head=2&query=5", "--window-size=900,700", f"--screenshot={tmp_path / 'a.png'}")
    _not_blank(tmp_path / "a.png")


def test_a_page_whose_script_fails_is_caught(tmp_path):
    """The checks above can fail: a script error is recorded on the page and the page never marks itself drawn."""
    page = tmp_path / "broken.html"
    page.write_text(render_page("broken", {"x": 1}, "<p>x</p>", "notAFunction(); document.body.dataset.rendered = '1';"))
    dom = _dom(page)
    assert re.search(r'<html[^>]*data-errors="1"', dom) and not re.search(r'<body[^>]*data-rendered="1"', dom)


def test_dashboard_command(stories_path, tmp_path):
    from hooked_mlx.cli import main
    from hooked_mlx.sae import save_sae

    sae = SAE(SAEConfig(hook_name="blocks.1.hook_resid_post", d_in=64, expansion_factor=2, architecture="topk", k=4))
    save_sae(sae, str(tmp_path / "sae"))
    out = tmp_path / "dash"
    assert main(["dashboard", str(stories_path), "--sae", str(tmp_path / "sae"), "--features", "1", "2", "--corpus",
                 str(CORPUS), "--max-docs", "8", "--examples", "3", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["feature_1.html", "feature_2.html", "index.html", "neuronpedia"]
    assert main(["dashboard", str(stories_path), "--attention", "Once upon a time", "--out", str(tmp_path / "a.html")]) == 0
    assert (tmp_path / "a.html").read_text().startswith("<!DOCTYPE html>")
