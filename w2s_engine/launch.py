"""What `w2s search` and `w2s serve` share: the model options and the engine they build.

Both the command (cli.py) and the server (serve/) import this module, and it imports neither.
`--large http://host:port/v1` is a black-box large model behind an OpenAI-compatible
completions server (large/openai_completions.py); anything else is loaded here.
"""

import argparse
import logging
import time

DEFAULT_LARGE = "gemma-3-270m"
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("w2s_engine.launch")


class UserError(Exception):
    """A mistake in the command line or its input: one line on stderr, exit 2."""


def is_url(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(("http://", "https://"))


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--large", default=DEFAULT_LARGE,
                   help="large model: a bundled name, a Hugging Face directory or hub id, a GGUF "
                        "file, a LoRA adapter, or the URL of an OpenAI-compatible completions "
                        "server (http://host:port/v1: a black box the small models steer)")
    p.add_argument("--large-model", default=None,
                   help="with a URL for --large: the model name at that server (default: the "
                        "first it lists)")
    p.add_argument("--large-api-key", default=None,
                   help="with a URL for --large: that server's API key (default: none)")
    p.add_argument("--tuned", default=None, help="tuned small model spec, e.g. sentiment-dpo (default: none; "
                                                      "the search needs one)")
    p.add_argument("--untuned", default=None, help="untuned small model spec, e.g. smollm2-135m-instruct "
                                                        "(default: none)")
    p.add_argument("--large-template", default="{prompt}", help="large model's prompt template")
    p.add_argument("--small-template", default="{prompt}", help="both small models' template")
    p.add_argument("--tuned-template", default=None,
                   help="tuned model's template (default: --small-template)")
    p.add_argument("--untuned-template", default=None,
                   help="untuned model's template (default: --small-template)")
    p.add_argument("--chat", action="store_true", help="use each tokenizer's chat template")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model and KV dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV blocks per model pool (default: from the memory budget)")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                   help="how much the package logs on stderr")


def setup_logging(level: str):
    """The package's log lines (and uvicorn's) on stderr, with time and logger name."""
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def remote_model_name(engine) -> str | None:
    """The model name at the black-box server an engine steers (None: a local large model)."""
    client = getattr(engine.large, "client", None)
    return getattr(client, "model", None)


def _remote(args):
    from w2s_engine.large.openai_completions import OpenAICompletions
    model = args.large_model
    if model is None:
        import openai
        try:
            listed = openai.OpenAI(base_url=args.large, api_key=args.large_api_key or "none",
                                   max_retries=2, timeout=30).models.list().data
        except openai.APIError as e:
            raise UserError(f"--large {args.large}: cannot list its models ({e}); name one "
                            "with --large-model") from None
        if not listed:
            raise UserError(f"--large {args.large} lists no models: name one with --large-model")
        model = listed[0].id
    log.info("large model: %s at %s (a black box)", model, args.large)
    return OpenAICompletions(args.large, model=model, api_key=args.large_api_key)


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
    remote = is_url(args.large)
    if remote and not need_small:
        raise UserError("a black-box large model (--large URL) is steered by the small models: "
                        "give --tuned and --untuned")
    overrides = dict(config)
    if args.device:
        overrides["device"] = args.device
    if args.dtype:
        overrides["dtype"] = getattr(torch, args.dtype)
    if args.kv_blocks:
        overrides["num_kv_blocks"] = args.kv_blocks
    large = _remote(args) if remote else args.large
    started = time.perf_counter()
    log.info("loading the models: large %s, tuned %s, untuned %s", args.large,
             tuned if need_small else "-", untuned if need_small else "-")
    engine = Engine(large, tuned if need_small else None, untuned if need_small else None,
                    templates=templates, chat=args.chat, **overrides)
    log.info("engine ready in %.1f s: %d KV blocks of %d tokens per pool, on %s",
             time.perf_counter() - started, engine.budget.num_blocks, engine.config.block_size,
             engine.config.device)
    return engine
