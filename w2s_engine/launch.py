"""What `w2s search` and `w2s serve` share: the model options and the engine they build.

Both the command (cli.py) and the server (serve/) import this module, and it imports neither.
"""

import argparse

DEFAULT_LARGE = "gemma-3-270m"


class UserError(Exception):
    """A mistake in the command line or its input: one line on stderr, exit 2."""


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--large", default=DEFAULT_LARGE, help="large model spec (bundled name, dir, GGUF, adapter)")
    p.add_argument("--tuned", default=None, help="tuned small model spec")
    p.add_argument("--untuned", default=None, help="untuned small model spec")
    p.add_argument("--large-template", default="{prompt}", help="large model's prompt template")
    p.add_argument("--small-template", default="{prompt}", help="both small models' template")
    p.add_argument("--tuned-template", default=None, help="tuned model's template (overrides --small-template)")
    p.add_argument("--untuned-template", default=None, help="untuned model's template")
    p.add_argument("--chat", action="store_true", help="use each tokenizer's chat template")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-blocks", type=int, default=None, help="KV blocks per model pool")


def engine_from_args(args, need_small: bool, **config):
    """The engine the model options describe; config: more EngineConfig fields."""
    import torch

    from w2s_engine.engine import Engine
    tuned = args.tuned
    untuned = args.untuned
    templates = {"large": args.large_template, "small": args.small_template}
    if args.tuned_template:
        templates["tuned"] = args.tuned_template
    if args.untuned_template:
        templates["untuned"] = args.untuned_template
    if need_small and (tuned is None or untuned is None):
        raise UserError("this method needs --tuned and --untuned small models (or use --method base)")
    overrides = dict(config)
    if args.device:
        overrides["device"] = args.device
    if args.dtype:
        overrides["dtype"] = getattr(torch, args.dtype)
    if args.kv_blocks:
        overrides["num_kv_blocks"] = args.kv_blocks
    return Engine(args.large, tuned if need_small else None, untuned if need_small else None,
                  templates=templates, chat=args.chat, **overrides)
