"""The `w2s` command: search, demo, serve."""

import argparse
import json
import sys

from w2s_engine.launch import UserError, add_model_args, engine_from_args


def _add_search_args(p: argparse.ArgumentParser):
    p.add_argument("--method", default="cbs", choices=["cbs", "best_of_n", "base", "eft"],
                   help="chunk-level beam search, Best-of-N, plain sampling or token-level EFT")
    p.add_argument("--w", type=int, default=4, help="beams kept after each chunk")
    p.add_argument("--k", type=int, default=4, help="children per beam (N for best_of_n)")
    p.add_argument("--l", type=int, default=5, help="chunk length in large-model tokens")
    p.add_argument("--max-new-tokens", type=int, default=50, help="response length cap")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 is off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 is off")
    p.add_argument("--beta", type=float, default=1.0, help="EFT strength")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same results")


def params_from_args(args):
    from w2s_engine.params import SearchParams
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop)
    if args.method == "best_of_n":
        return SearchParams.best_of_n(args.k, **common)
    if args.method == "base":
        return SearchParams.base(**common)
    if args.method == "eft":
        return SearchParams.eft(args.beta, **common)
    return SearchParams.cbs(args.w, args.k, args.l, **common)


def cmd_search(args):
    params = params_from_args(args)
    try:
        params.validate()
    except ValueError as e:
        raise UserError(str(e))
    engine = engine_from_args(args, need_small=params.uses_small_models)
    results = engine.search(args.prompts, params)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    for r in results:
        reward = "" if r.reward is None else f"  [reward {r.reward:+.3f}]"
        print(f"{r.prompt}{r.text}{reward}")


def cmd_demo(args):
    from w2s_engine.tasks.sentiment import run_demo
    run_demo(num_prompts=args.prompts, max_new_tokens=args.max_new_tokens, seed=args.seed)


def cmd_serve(args):
    try:
        from w2s_engine.serve.server import serve
    except ImportError as e:
        raise UserError(f"the server needs the 'serve' extra: pip install 'w2s-engine[serve]' ({e})")
    serve(args)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="w2s", formatter_class=fmt,
                                     description="Weak-to-strong search: steer a large model with a small tuned/untuned pair.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", formatter_class=fmt, help="search continuations of prompts")
    s.add_argument("prompts", nargs="+", help="one or more prompts")
    add_model_args(s)
    _add_search_args(s)
    s.add_argument("--json", action="store_true", help="print all hypotheses and stats as JSON")
    s.set_defaults(func=cmd_search)

    d = sub.add_parser("demo", formatter_class=fmt,
                       help="the main job: base, Best-of-16 and CBS on the bundled models")
    d.add_argument("--prompts", type=int, default=4, help="test prompts to run")
    d.add_argument("--max-new-tokens", type=int, default=30)
    d.add_argument("--seed", type=int, default=1)
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("serve", formatter_class=fmt, help="OpenAI-compatible HTTP server")
    add_model_args(v)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for KV memory before 429 (those that fit run at once)")
    v.add_argument("--served-model-name", default=None,
                   help="the model name in /v1/models and responses (default: --large's base "
                        "name; never a local path)")
    v.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names to answer ('*' for any; default: "
                        "the loopback names when bound to loopback, else any)")
    v.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="request body limit; past it the answer is 413")
    v.add_argument("--max-prompt-chars", type=int, default=None,
                   help="prompt length limit in characters, checked before tokenizing "
                        "(default: 32 per token of the models' smallest context)")
    v.set_defaults(func=cmd_serve)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"w2s: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError) as e:
        # Model specs, templates and parameters: the engine's message says what to change.
        print(f"w2s: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
