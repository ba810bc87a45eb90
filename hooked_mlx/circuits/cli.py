"""``hooked-mlx attribute``: the attribution graph of a prompt through per-layer transcoders.

    hooked-mlx attribute MODEL --transcoders DIR "Once upon a time" --out graph.json --html graph.html

Writes circuit-tracer's graph JSON (Neuronpedia's graph viewer reads it) and a self-contained HTML viewer (with
each kept feature's top contexts when ``--corpus`` is given), and prints the node and edge counts and the
replacement and completeness scores. Pruning keeps ``--node-threshold`` of the influence on the logits among
features and ``--edge-threshold`` among edges (circuit-tracer's defaults, 0.8 and 0.98).
"""

from __future__ import annotations

import argparse
import time


def cmd_attribute(args) -> int:
    from ..model import HookedTransformer
    from .attribution import attribute
    from .graph import graph_scores, prune_graph
    from .output import graph_contexts, write_graph
    from .transcoder_sets import load_transcoders

    if not args.out and not args.html:
        raise SystemExit("hooked-mlx attribute: give --out graph.json and / or --html graph.html.")
    model = HookedTransformer.from_pretrained(args.model)
    tcs = load_transcoders(args.transcoders)
    t0 = time.perf_counter()
    g = attribute(model, tcs, args.prompt, max_n_logits=args.max_n_logits, max_logit_prob=args.max_logit_prob,
                  batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    pr = prune_graph(g, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
    contexts = graph_contexts(model, tcs, g, args.corpus, prune=pr, max_docs=args.max_docs) if args.corpus else None
    write_graph(g, json_path=args.out, html_path=args.html, prune=pr, model_id=args.model, decode=model.to_string,
                contexts=contexts, overwrite=args.overwrite)
    replacement, completeness = graph_scores(g)
    print(f"{g.n_nodes} nodes ({g.n_features} active features), {int((g.adjacency != 0).sum())} edges in "
          f"{seconds:.2f} s; pruned: {int(pr.node_mask.sum())} nodes, {int(pr.edge_mask.sum())} edges; replacement "
          f"score {replacement:.3f}, completeness {completeness:.3f}")
    for path in (args.out, args.html):
        if path:
            print(f"wrote {path}")
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("attribute", help="attribution graph of a prompt through per-layer transcoders",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder (mlx-lm, Hugging Face, hooked_mlx checkpoint) or .gguf file")
    p.add_argument("prompt", help="the prompt")
    p.add_argument("--transcoders", required=True,
                   help="folder with one transcoder subfolder per layer, or circuit-tracer's config.yaml layout (a "
                        "transcoder set or a cross-layer transcoder, e.g. what train-clt writes)")
    p.add_argument("--out", help="graph JSON (circuit-tracer's format)")
    p.add_argument("--html", help="HTML viewer")
    p.add_argument("--corpus", help="documents in which to find each kept feature's top contexts (for --html)")
    p.add_argument("--max-docs", type=int, default=100, help="documents read for the contexts (default 100)")
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--max-logit-prob", type=float, default=0.95)
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--batch-size", type=int, default=None,
                   help="targets per vector-Jacobian product (default: as many as fit in about 1 GB)")
    p.add_argument("--overwrite", action="store_true", help="replace the files this command writes")
    p.set_defaults(func=cmd_attribute)


def cmd_train_clt(args) -> int:
    import os

    from ..model import HookedTransformer
    from ..outputs import check_output_dir
    from ..sae.cli import config_from_args
    from ..sae.store import ActivationStore
    from .clt_training import CHECKPOINT, save_clt, train_clt
    from .transcoders import HOOK_OUT

    own = {"config.yaml", "checkpoint"}
    check_output_dir(args.out, sources=[args.model, args.data if os.path.exists(args.data) else None],
                     overwrite=args.overwrite, what="train-clt --out",
                     allowed=lambda name: args.resume and (name in own or name.startswith(("W_enc_", "W_dec_"))))
    model = HookedTransformer.from_pretrained(args.model)
    L = model.cfg.n_layers
    cfg = config_from_args(args, f"blocks.0.{args.hook_in}").replace(model_name=args.model)
    hooks = [f"blocks.{layer}.{h}" for h in (args.hook_in, HOOK_OUT) for layer in range(L)]
    source = ActivationStore(model, hooks, args.data, cfg, text_field=args.text_field)
    checkpoint = os.path.join(args.out, "checkpoint")
    clt = train_clt(cfg, source, n_layers=L, hook_in=args.hook_in, checkpoint_path=checkpoint, resume=args.resume,
                    overwrite=args.overwrite, progress=not args.quiet)
    save_clt(clt, args.out, overwrite=True)  # (--out was checked above: new, empty, or this command's own files)
    print(f"wrote a {L}-layer cross-layer transcoder ({clt.d_transcoder} features per layer, k {cfg.k}) to "
          f"{args.out} (checkpoint: {os.path.join(checkpoint, CHECKPOINT)}); attribute with --transcoders {args.out}")
    return 0


def add_train_clt_subcommand(sub) -> None:
    from ..sae.cli import add_config_flags
    from .transcoders import HOOK_INS

    p = sub.add_parser("train-clt", help="train a cross-layer transcoder (TopK) on a model's MLPs, all layers from "
                       "one forward per batch; writes circuit-tracer's CLT layout",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="hooked-mlx train-clt MODEL --data docs.txt --out clt/ --k 16 --d-sae 4096 "
                                   "--tokens 2000000\n\nEvery layer's encoder reads blocks.L.<--hook-in>; its "
                                   "features write to the MLP outputs of that layer and all later ones.")
    p.add_argument("model", help="model folder or .gguf file")
    p.add_argument("--data", required=True, help="corpus: .txt (blank-line separated documents) / .jsonl")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", required=True, help="output folder (new or empty; the checkpoint goes in OUT/checkpoint)")
    p.add_argument("--hook-in", default=HOOK_INS[0], choices=list(HOOK_INS), help="what each layer's encoder reads")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (replacing its CLT files)")
    p.add_argument("--quiet", action="store_true")
    add_config_flags(p)
    p.set_defaults(func=cmd_train_clt)
