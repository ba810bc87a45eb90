"""Feature dashboards: the data of a feature (top-activating contexts, activation density and histogram, logit
effects) as Neuronpedia-style records, written as self-contained HTML pages and JSON.

    from hooked_mlx.sae.dashboard import write_dashboards
    write_dashboards(model, sae, [12, 40], corpus, "dash/")      # dash/index.html, feature_12.html, ...

``feature_dashboard_data`` gives the records (one pass over the corpus for the contexts, one for the
histograms); ``write_dashboards`` renders them with ``hooked_mlx.viz`` and writes, for each feature,
``feature_<i>.html`` and ``neuronpedia/<i>.json``, plus ``index.html``, into a new or empty folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..host import to_floats
from ..outputs import staged_dir
from ..viz import render_feature_index, render_feature_page
from .analysis import feature_logit_effects, feature_stats, top_contexts, unembedding
from .sae import SAE


def _model_id(model) -> str:
    return str(getattr(model.cfg, "model_name", "") or "model")


def feature_dashboard_data(model, sae: SAE, features: int | list[int], corpus, *, n_examples: int = 10,
                           window: tuple[int, int] = (10, 5), k_logits: int = 10, bins: int = 30,
                           batch_size: int = 8, context_size: int | None = None, max_docs: int | None = None,
                           text_field: str = "text") -> dict[int, dict]:
    """{feature: record} with Neuronpedia's field names: ``modelId``, ``layer`` (the hook), ``index``,
    ``activations`` [{"tokens", "values", "maxValue", "maxValueTokenIndex"}] (the top contexts where the feature
    fires, strongest first), ``pos_str`` / ``pos_values`` and ``neg_str`` / ``neg_values`` (W_dec[f] @ W_U; empty
    when the SAE's width is not d_model), ``frac_nonzero``, ``freq_hist_data_bar_values`` (bin centres) /
    ``freq_hist_data_bar_heights`` (counts) of the non-zero activations, ``max_activation`` and ``n_tokens``."""
    feats = [features] if isinstance(features, int) else [int(f) for f in features]
    contexts = top_contexts(model, sae, feats, corpus, n=n_examples, window=window, batch_size=batch_size,
                            context_size=context_size, max_docs=max_docs, text_field=text_field)
    stats = feature_stats(model, sae, feats, corpus, bins=bins, batch_size=batch_size, context_size=context_size,
                          max_docs=max_docs, text_field=text_field)
    logits = None
    if unembedding(model).shape[0] == sae.d_in:
        logits = feature_logit_effects(model, sae, feats, k=k_logits)
    out = {}
    for j, f in enumerate(feats):
        acts = []
        for ex in contexts[f]:
            if ex.value <= 0:  # (top_contexts ranks every position; a dashboard shows where the feature fires)
                continue
            acts.append({"tokens": list(ex.str_tokens), "values": [float(v) for v in ex.activations],
                         "maxValue": float(ex.value), "maxValueTokenIndex": int(ex.highlight)})
        rec = {"modelId": _model_id(model), "layer": sae.cfg.hook_name, "index": f, "activations": acts,
               "pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
               "frac_nonzero": stats.frac_nonzero[j], "freq_hist_data_bar_values": stats.hist_centres[j],
               "freq_hist_data_bar_heights": stats.hist_counts[j], "max_activation": stats.max_value[j],
               "n_tokens": stats.n_tokens}
        if logits is not None:
            rec.update(pos_str=list(logits.top_str[j]), pos_values=to_floats(logits.top_values[j]),
                       neg_str=list(logits.bottom_str[j]), neg_values=to_floats(logits.bottom_values[j]))
        out[f] = rec
    return out


def write_dashboards(model, sae: SAE, features: int | list[int], corpus, out: str | Path, *, overwrite: bool = False,
                     **kw) -> Path:
    """Write the dashboards of ``features`` into folder ``out`` (new or empty; ``overwrite=True`` replaces only
    the files this writes): ``index.html``, ``feature_<i>.html`` and ``neuronpedia/<i>.json`` per feature.
    ``kw``: ``feature_dashboard_data``'s options. Returns the folder."""
    data = feature_dashboard_data(model, sae, features, corpus, **kw)
    rows = []
    with staged_dir(out, overwrite=overwrite, what="write_dashboards") as tmp:
        (tmp / "neuronpedia").mkdir()
        for f, rec in data.items():
            (tmp / f"feature_{f}.html").write_text(render_feature_page(rec), encoding="utf-8")
            (tmp / "neuronpedia" / f"{f}.json").write_text(json.dumps(rec, indent=1), encoding="utf-8")
            rows.append({"index": f, "file": f"feature_{f}.html", "frac_nonzero": rec["frac_nonzero"],
                         "max_activation": rec["max_activation"], "pos_str": rec["pos_str"]})
        title = f"{sae.cfg.hook_name or 'SAE'} - {_model_id(model)}"
        (tmp / "index.html").write_text(render_feature_index(title, rows), encoding="utf-8")
    return Path(out)
