"""The ``hooked-mlx`` command. Thin: it parses arguments and calls the library.

    hooked-mlx convert SRC [OUT] [--dtype float32|bfloat16|float16] [--dequantize] [--fold-ln ...]
    hooked-mlx hooks MODEL [--filter PATTERN]
    hooked-mlx train-sae / harvest ...   (see hooked_mlx.sae)
    hooked-mlx demo [--model PATH]
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from pathlib import Path
from typing import cast

SAMPLE_PROMPT = "Once upon a time, there was a little girl named Lily."


def _add_convert(sub):
    p = sub.add_parser("convert", help="write a canonical hooked_mlx checkpoint from an mlx-lm dir, hub id or .gguf")
    p.add_argument("src", help="mlx-lm / Hugging Face directory, canonical directory, .gguf file or hub id")
    p.add_argument("out", nargs="?", default=None, help="output directory (default: weights/<name>/)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument("--dequantize", action="store_true", help="store float weights instead of quantized ones")
    p.add_argument("--revision", default=None, help="hub revision")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty OUT, replacing only the files convert writes")
    for opt in _processing_options():
        p.add_argument("--" + opt.replace("_", "-"), action="store_true", dest=opt,
                       help=f"apply {opt} (weight processing; see hooked_mlx.processing)")
    p.set_defaults(func=cmd_convert)


def _processing_options() -> list[str]:
    try:
        from .processing import PROCESSING_OPTIONS
    except ImportError:
        return []
    return list(PROCESSING_OPTIONS)


def _default_out(src: str) -> Path:
    name = Path(src.rstrip("/")).name
    name = re.sub(r"\.gguf$", "", name)
    return Path("weights") / name


def _sample_tokens(model):
    import mlx.core as mx

    if model.tokenizer is not None:
        return model.to_tokens(SAMPLE_PROMPT)
    n = min(16, model.cfg.n_ctx)
    return mx.array([[(i * 37 + 11) % model.cfg.d_vocab for i in range(n)]], dtype=mx.int32)


def cmd_convert(args) -> int:
    import mlx.core as mx

    from .loading import read_checkpoint, save_canonical
    from .loading.checkpoint import resolve_path
    from .model import HookedTransformer
    from .outputs import check_output_dir

    processing = {opt: True for opt in _processing_options() if getattr(args, opt, False)}
    src_path = resolve_path(args.src, args.revision)
    out = Path(args.out) if args.out else _default_out(args.src)
    # refuse a bad output before the (possibly long) load
    check_output_dir(out, sources=[src_path], overwrite=args.overwrite, what="convert")
    ck = read_checkpoint(args.src, revision=args.revision)
    # convert keeps the stored quantization unless told (--dequantize): the canonical file mirrors the source
    model = HookedTransformer.from_checkpoint(ck, dtype=args.dtype, dequantize=args.dequantize,
                                              keep_quantized=not args.dequantize, **processing)
    print(f"converting {args.src} -> {out}  ({model})")
    save_canonical(model, out, tokenizer_dir=ck.tokenizer_dir,
                   tokenizer=ck.tokenizer if ck.tokenizer_dir is None else None,
                   hf_config=ck.hf_config, overwrite=args.overwrite, sources=(src_path,))
    # reload both and compare logits on a fixed prompt
    src_model = HookedTransformer.from_pretrained(args.src, dtype=args.dtype, dequantize=args.dequantize,
                                                  keep_quantized=not args.dequantize,
                                                  revision=args.revision, **processing)
    new_model = HookedTransformer.from_pretrained(out, keep_quantized=not args.dequantize)
    toks = _sample_tokens(src_model)
    a = cast(mx.array, src_model(toks)).astype(mx.float32)  # logits (the default return_type)
    b = cast(mx.array, new_model(toks)).astype(mx.float32)
    if processing:  # processing may shift logits by a per-position constant (center_unembed): compare log-probs
        import mlx.nn as nn

        a, b = nn.log_softmax(a, axis=-1), nn.log_softmax(b, axis=-1)
    diff = mx.abs(a - b).max().item()
    print(f"wrote {out} ; reloaded both: max |logit difference| on a fixed {toks.shape[1]}-token prompt = {diff:.3g}")
    return 0


def _add_hooks(sub):
    p = sub.add_parser("hooks", help="list every hook name with its shape on a sample input")
    p.add_argument("model", help="checkpoint directory, .gguf file or hub id")
    p.add_argument("--filter", default=None,
                   help="only names matching this pattern (glob such as '*attn*', or a regex)")
    p.add_argument("--prompt", default=SAMPLE_PROMPT, help="sample input text")
    p.set_defaults(func=cmd_hooks)


def cmd_hooks(args) -> int:
    from .model import HookedTransformer

    model = HookedTransformer.from_pretrained(args.model)
    names = list(model.hook_dict)
    if args.filter:
        pat = args.filter
        if any(c in pat for c in "*?["):
            names = [n for n in names if fnmatch.fnmatch(n, pat)]
        else:
            rx = re.compile(pat)
            names = [n for n in names if rx.search(n)]
        if not names:
            from .names import closest_names

            close = closest_names(pat, model.hook_dict)
            print(f"no hook name matches {pat!r}. Closest: {', '.join(close) or '(none)'}", file=sys.stderr)
            return 2
    toks = model.to_tokens(args.prompt) if model.tokenizer is not None else _sample_tokens(model)
    _, cache = model.run_with_cache(toks, names_filter=names)
    print(f"{model}\nsample input: {toks.shape[1]} tokens; {len(names)} hooks")
    width = max(len(n) for n in names)
    for n in names:
        shape = tuple(cache[n].shape) if n in cache.cache_dict else "(did not fire)"
        print(f"{n:<{width}}  {shape}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooked-mlx", description="Hooked transformers, patching and SAEs on MLX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_convert(sub)
    _add_hooks(sub)
    try:
        from .sae.cli import add_subcommands as add_sae
    except ImportError:
        pass
    else:
        add_sae(sub)
    from .circuits.cli import add_subcommand as add_attribute
    from .circuits.cli import add_train_clt_subcommand as add_train_clt
    from .dashboard_cli import add_subcommand as add_dashboard

    add_dashboard(sub)
    add_attribute(sub)
    add_train_clt(sub)
    try:
        from .demo import add_subcommand as add_demo
    except ImportError:
        pass
    else:
        add_demo(sub)
    return parser


def main(argv=None) -> int:
    from . import _blas

    _blas.load_blas()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"hooked-mlx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
