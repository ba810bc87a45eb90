"""``hooked-mlx dashboard``: feature dashboards of an SAE, or a prompt's attention patterns, as HTML pages.

    hooked-mlx dashboard MODEL --sae SAE_DIR --features 3 17 40 --corpus stories.txt --out dash/
    hooked-mlx dashboard MODEL --attention "Once upon a time" --out attention.html

Feature pages (``hooked_mlx.sae.dashboard.write_dashboards``): ``index.html``, ``feature_<i>.html`` and the
Neuronpedia-style ``neuronpedia/<i>.json`` in a new or empty folder. The attention viewer is one HTML file. Both
are self-contained (no network when viewed); ``--overwrite`` replaces only the files the command writes.
"""

from __future__ import annotations

import argparse
import sys


def cmd_dashboard(args) -> int:
    from .model import HookedTransformer
    from .outputs import write_text_atomic

    if bool(args.sae) == bool(args.attention):
        raise SystemExit("hooked-mlx dashboard: give --sae (feature dashboards) or --attention TEXT (attention "
                         "viewer), not both or neither.")
    model = HookedTransformer.from_pretrained(args.model)
    if args.attention:
        from .viz import attention_data, render_attention_page

        page = render_attention_page(attention_data(model, args.attention))
        out = write_text_atomic(args.out, page, overwrite=args.overwrite, what="hooked-mlx dashboard")
        print(f"attention viewer: {out}")
        return 0
    from .sae import load_sae
    from .sae.dashboard import write_dashboards

    if not args.features or not args.corpus:
        raise SystemExit("hooked-mlx dashboard --sae needs --features (latent indices) and --corpus (a .txt / .jsonl "
                         "file of documents to find the top-activating contexts in).")
    sae = load_sae(args.sae)
    out = write_dashboards(model, sae, args.features, args.corpus, args.out, overwrite=args.overwrite,
                           n_examples=args.examples, max_docs=args.max_docs, context_size=args.context_size)
    print(f"dashboards of {len(args.features)} feature(s): {out / 'index.html'}")
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("dashboard", help="feature dashboards of an SAE, or an attention-pattern viewer (HTML)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder (mlx-lm, Hugging Face or hooked_mlx checkpoint) or .gguf file")
    p.add_argument("--sae", help="SAE folder (hooked_mlx, SAELens, sparsify or Gemma Scope)")
    p.add_argument("--features", type=int, nargs="+", help="latent indices to draw")
    p.add_argument("--corpus", help="documents (.txt, .jsonl) in which to find each feature's top contexts")
    p.add_argument("--examples", type=int, default=10, help="top-activating contexts per feature (default 10)")
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    p.add_argument("--context-size", type=int, default=None, help="tokens per document (default: the SAE's)")
    p.add_argument("--attention", metavar="TEXT", help="draw this prompt's attention patterns instead")
    p.add_argument("--out", required=True, help="output folder (--sae) or .html file (--attention)")
    p.add_argument("--overwrite", action="store_true", help="replace the files this command writes")
    p.set_defaults(func=cmd_dashboard)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="hooked-mlx")
    add_subcommand(parser.add_subparsers(dest="command"))
    a = parser.parse_args()
    sys.exit(a.func(a))
