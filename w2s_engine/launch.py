"""What `w2s search` and `w2s serve` share: the model options and the engine they build.

Both the command (cli.py) and the server (serve/) import this module, and it imports neither.
`--large http://host:port/v1` is a black-box large model behind an OpenAI-compatible
completions server (large/openai_completions.py); anything else is loaded here.
"""

import argparse
import logging
import os
import sys
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
    p.add_argument("--large-timeout", type=positive_seconds, default=None,
                   help="with a URL for --large: seconds one call to that server may take in "
                        "all, retries included; past them the search it belongs to fails "
                        "(default: 120)")
    p.add_argument("--large-max-in-flight", type=positive_int, default=None,
                   help="with a URL for --large: calls to that server at once, for all "
                        "searches together (default: 32)")
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
    p.add_argument("--kv-blocks", type=positive_int, default=None,
                   help="KV blocks per model pool (default: from the memory budget)")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                   help="how much the package logs on stderr (error: transformers' loading "
                        "bars and warnings too)")
    add_runtime_args(p)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give 0 or more")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds: give 0 or more")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} seconds: give a time above 0")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port: give 0-65535")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def add_runtime_args(p: argparse.ArgumentParser):
    """How the engine runs on the device (EngineConfig): memory, batching, the decode's CUDA
    graphs and the switches a GPU is still to measure."""
    g = p.add_argument_group("engine runtime")
    g.add_argument("--kv-cache-memory-fraction", type=fraction, default=None,
                   help="share of the GPU memory free after loading that the KV pools and "
                        "the CUDA graphs take (default: 0.85; a CPU's pools take 2 GiB)")
    g.add_argument("--max-batch-tokens", type=positive_int, default=8192,
                   help="prompt tokens a step forwards per model at most (a long prompt is "
                        "prefilled in chunks of this size), and the new tokens a scoring "
                        "forward batches (one beam's own update goes whole)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: every decode step runs eagerly (as vLLM's flag)")
    g.add_argument("--cuda-graph-max-batch", type=positive_int, default=512,
                   help="beams in a decode step that a CUDA graph covers at most (more run "
                        "eagerly)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                   help="launch decode step n+1 before reading step n's tokens (default: on "
                        "with CUDA)")
    g.add_argument("--scoring-at-once", action="store_true",
                   help="with async scheduling: read each chunk's scoring in its own step, "
                        "not the next (behind the other requests' decode step)")
    g.add_argument("--cascade-attention", action=argparse.BooleanOptionalAction,
                   help="shared-prefix decode attention: a request's beams read their common "
                        "blocks once (default: on with CUDA graphs)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="keep prompts' KV blocks by their tokens for later prompts that start "
                        "alike (as vLLM's flag; default: on)")
    g.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: the large model's linear layers in float8 with a scale per "
                        "weight row, each token's input quantized as it comes (vLLM's "
                        "dynamic FP8; on CUDA it needs bfloat16 and an FP8 GPU: Ada, Hopper) "
                        "(default: none, the weights as they load)")
    g.add_argument("--torch-compile", action="store_true",
                   help="run every model's forward through torch.compile")
    g.add_argument("--no-fused-ops", action="store_true",
                   help="transformers' own RMSNorm, rotary-embedding, MLP-activation and "
                        "residual-add ops and separate q/k/v and gate/up GEMMs instead of the "
                        "engine's one-kernel versions and merged GEMMs (on by default with "
                        "CUDA)")


def runtime_config(args) -> dict:
    """The EngineConfig fields add_runtime_args' options set."""
    if args.scoring_at_once and args.async_scheduling is False:
        raise UserError("--scoring-at-once changes how async scheduling reads the scoring: "
                        "leave out --no-async-scheduling, or --scoring-at-once")
    config = {"kv_cache_memory_fraction": args.kv_cache_memory_fraction,
              "max_batch_tokens": args.max_batch_tokens,
              "cuda_graph_max_batch": args.cuda_graph_max_batch,
              "async_scheduling": args.async_scheduling,
              "scoring_ahead": not args.scoring_at_once,
              "cascade_attention": args.cascade_attention,
              "prefix_caching": args.enable_prefix_caching,
              "quantization": args.quantization,
              "torch_compile": args.torch_compile}
    if args.no_fused_ops:
        config["fused_ops"] = False
    if args.enforce_eager:
        if args.cascade_attention:    # (left out: off, as the static path is)
            raise UserError("--cascade-attention runs on the CUDA graphs' static decode path: "
                            "leave out --enforce-eager")
        config["cuda_graphs"] = False
    elif args.cascade_attention:
        config["cuda_graphs"] = True    # the static path (eager on a CPU) it runs on
    return config


def setup_logging(level: str):
    """The package's log lines (and uvicorn's) on stderr, with time and logger name. At
    "error", transformers' and the hub's loading bars and warnings go quiet too: they print
    through their own handlers, whatever this level says."""
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level == "error":
        # Read when transformers and huggingface_hub are imported (not yet, in the command);
        # a variable the user set wins.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if "transformers" in sys.modules:
            import transformers
            transformers.utils.logging.disable_progress_bar()
            transformers.utils.logging.set_verbosity_error()


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
            if not all(isinstance(getattr(m, "id", None), str) for m in listed):
                raise TypeError("the answer is no list of models")
        # (a 200 that is no model list, an HTML page say, fails in the client as one of these)
        except (openai.APIError, AttributeError, TypeError, ValueError) as e:
            status = getattr(e, "status_code", None)
            hint = ("is --large the server's OpenAI-compatible /v1 base URL "
                    "(http://host:port/v1)? " if status in (None, 404) else "")
            raise UserError(f"--large {args.large}: cannot list its models ({type(e).__name__}: "
                            f"{e}); {hint}or name the model with --large-model") from None
        if not listed:
            raise UserError(f"--large {args.large} lists no models: name one with --large-model")
        model = listed[0].id
    log.info("large model: %s at %s (a black box)", model, args.large)
    options = {name: value for name, value in (("timeout", args.large_timeout),
                                               ("max_in_flight", args.large_max_in_flight))
               if value is not None}
    return OpenAICompletions(args.large, model=model, api_key=args.large_api_key, **options)


# The EngineConfig fields the options set, as the engine's errors name them.
CONFIG_FLAGS = {"device": "--device", "dtype": "--dtype", "num_kv_blocks": "--kv-blocks",
                "max_batch_tokens": "--max-batch-tokens",
                "cuda_graph_max_batch": "--cuda-graph-max-batch",
                "kv_cache_memory_fraction": "--kv-cache-memory-fraction",
                "quantization": "--quantization"}


def flag_named(message: str) -> str:
    """An engine setting's error as the command's user reads it: by its option's name."""
    for field, flag in CONFIG_FLAGS.items():
        message = message.replace(f"EngineConfig.{field}=", f"{flag} ")
    return message


def model_flag_named(message: str, specs: dict) -> str:
    """A model's load error as the command's user reads it: by the flag that named the model
    (the loader names it by its spec alone, and --tuned and --untuned may differ by a letter)."""
    for flag, spec in specs.items():
        for kind in ("model", "adapter"):
            if message.startswith(f"{kind} {spec!r}"):
                return f"{flag} {spec}" + message[len(f"{kind} {spec!r}"):]
    return message


def check_model_specs(specs: dict):
    """Every model the flags name exists, checked before the first loads (which can take
    minutes): a typo in --untuned is not said after the large model is in memory."""
    from w2s_engine.models.loader import ModelLoadError, check_spec
    for flag, spec in specs.items():
        try:
            check_spec(spec)
        except ModelLoadError as e:
            raise UserError(model_flag_named(str(e), {flag: spec})) from None


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
    remote = is_url(args.large)
    for flag, value in (("--large-model", args.large_model),
                        ("--large-api-key", args.large_api_key),
                        ("--large-timeout", args.large_timeout),
                        ("--large-max-in-flight", args.large_max_in_flight)):
        if value is not None and not remote:
            raise UserError(f"{flag} is for a black-box large model (--large http://.../v1); "
                            f"--large {args.large} is loaded here: leave {flag} out")
    if (tuned is None) != (untuned is None):
        # (a method without small models would ignore the one given: a mistake either way)
        given, missing = ("--tuned", "--untuned") if untuned is None else ("--untuned", "--tuned")
        raise UserError(f"{given} without {missing}: the small models are a pair: give "
                        f"{missing} too, or neither (the large model alone: plain sampling)")
    if remote and args.chat:
        raise UserError("--chat renders each prompt with each model's chat template, and a "
                        "black-box large model's is not here: leave --chat out and write the "
                        "chat format into --large-template and --small-template")
    if remote and (tuned is None or untuned is None):
        raise UserError("a black-box large model (--large URL) is steered by the small models: "
                        "give --tuned and --untuned")
    if need_small and (tuned is None or untuned is None):
        raise UserError("this method needs --tuned and --untuned small models (or use --method base)")
    need_small = need_small or remote    # a black box's engine has its scorer, as the server's
    overrides = {**runtime_config(args), **config}
    if args.device:
        overrides["device"] = args.device
    if args.dtype:
        overrides["dtype"] = getattr(torch, args.dtype)
    if args.kv_blocks is not None:
        overrides["num_kv_blocks"] = args.kv_blocks
    specs = {flag: spec for flag, spec in (("--large", None if remote else args.large),
                                           ("--tuned", tuned if need_small else None),
                                           ("--untuned", untuned if need_small else None))
             if spec is not None}
    check_model_specs(specs)
    large = _remote(args) if remote else args.large
    started = time.perf_counter()
    log.info("loading the models: large %s, tuned %s, untuned %s", args.large,
             tuned if need_small else "-", untuned if need_small else "-")
    try:
        engine = Engine(large, tuned if need_small else None, untuned if need_small else None,
                        templates=templates, chat=args.chat, **overrides)
    except (ValueError, TypeError) as e:
        named = model_flag_named(flag_named(str(e)), specs)
        if named == str(e):
            raise
        raise UserError(named) from None
    log.info("engine ready in %.1f s: %d KV blocks of %d tokens per pool, on %s",
             time.perf_counter() - started, engine.budget.num_blocks, engine.config.block_size,
             engine.config.device)
    return engine
