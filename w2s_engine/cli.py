"""The `w2s` command: search, demo, serve."""

import argparse
import json
import os
import re
import sys

import w2s_engine
from w2s_engine.launch import (LOG_LEVELS, UserError, add_model_args, engine_from_args,
                               nonnegative_int, port_number, positive_int, positive_seconds,
                               seconds, setup_logging)
from w2s_engine.params import DEFAULTS, METHODS, InvalidParam
from w2s_engine.tasks.sentiment import DEMO_PROMPTS

HELP = {"cbs": "chunk-level beam search", "best_of_n": "Best-of-N", "base": "plain sampling",
        "eft": "token-level EFT / proxy-tuning"}


# SearchParams fields every method takes, as flags: (field, type, help); defaults from DEFAULTS.
SAMPLING_FLAGS = (
    ("max_new_tokens", int, "response length cap"),
    ("temperature", float, "0 is greedy"),
    ("top_k", int, "0 is off"),
    ("top_p", float, "1.0 is off"),
    ("min_p", float, "keep tokens at least this times as likely as the best; 0 is off"),
    ("presence_penalty", float, "-2 to 2, 0 is off"),
    ("frequency_penalty", float, "-2 to 2, 0 is off"),
    ("repetition_penalty", float, "above 1 discourages repeats, 1.0 is off"),
    ("min_tokens", int, "no EOS, stop token or stop string before this many tokens"),
)


def _add_search_args(p: argparse.ArgumentParser):
    # Defaults: SearchParams' (params.DEFAULTS), the same for the Python API and the server.
    p.add_argument("--method", default=DEFAULTS.method, choices=METHODS,
                   help=", ".join(f"{m}: {HELP[m]}" for m in METHODS))
    p.add_argument("--w", type=int, default=None,
                   help=f"beams kept after each chunk (cbs) (default: {DEFAULTS.w})")
    p.add_argument("--k", type=int, default=None,
                   help=f"children per beam (N for best_of_n, samples for base and eft) "
                        f"(default: {DEFAULTS.k}; 1 sample for base and eft)")
    p.add_argument("--l", type=int, default=None,
                   help=f"chunk length in large-model tokens (cbs) (default: {DEFAULTS.l})")
    p.add_argument("--beta", type=float, default=None,
                   help=f"EFT strength (eft) (default: {DEFAULTS.beta:g})")
    for name, kind, help_ in SAMPLING_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(DEFAULTS, name),
                       help=help_)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", type=int, action="append", default=[], metavar="ID",
                   help="a large-model token id that ends a response as EOS does (vLLM's; "
                        "repeatable)")
    p.add_argument("--allowed-token-ids", type=int, action="append", default=[], metavar="ID",
                   help="the large-model token ids a response may hold, no other (vLLM's; "
                        "repeatable) (default: every id)")
    p.add_argument("--bad-words", action="append", default=[], metavar="WORD",
                   help="a word the response never holds (vLLM's; repeatable)")
    p.add_argument("--structured-output", type=json_value, default=None, metavar="JSON",
                   help="a structure every response follows (vLLM's structured outputs), as "
                        "JSON: '{\"json\": SCHEMA}', '{\"json_object\": true}', "
                        "'{\"regex\": \"...\"}', '{\"choice\": [...]}' or "
                        "'{\"grammar\": \"EBNF\"}' (default: free text)")
    p.add_argument("--include-stop-str-in-output", action="store_true",
                   help="keep the stop string that ended a response at its end (vLLM's)")
    p.add_argument("--seed", type=int, default=None,
                   help="same seed, same results (default: a random seed)")


def json_value(text: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None


def params_from_args(args):
    from w2s_engine.params import SearchParams
    common = {name: getattr(args, name) for name, _, _ in SAMPLING_FLAGS}
    common.update(seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_ids,
                  include_stop_str_in_output=args.include_stop_str_in_output,
                  allowed_token_ids=args.allowed_token_ids, bad_words=args.bad_words,
                  structured_output=args.structured_output)
    # A flag the method does not use is refused, not ignored (as the server does).
    unused = [flag for flag, value, used in [
        ("--w", args.w, args.method == "cbs" or args.w == 1),
        ("--l", args.l, args.method == "cbs"),
        ("--beta", args.beta, args.method == "eft" or args.beta == DEFAULTS.beta)]
        if value is not None and not used]
    if unused:
        raise UserError(f"{', '.join(unused)}: --method {args.method} does not use "
                        f"{'it' if len(unused) == 1 else 'them'}; leave "
                        f"{'it' if len(unused) == 1 else 'them'} out")
    pick = lambda value, default: default if value is None else value   # noqa: E731
    if args.method == "best_of_n":
        return SearchParams.best_of_n(pick(args.k, DEFAULTS.k), **common)
    if args.method == "base":
        return SearchParams.base(n=pick(args.k, 1), **common)
    if args.method == "eft":
        return SearchParams.eft(pick(args.beta, DEFAULTS.beta), n=pick(args.k, 1), **common)
    return SearchParams.cbs(pick(args.w, DEFAULTS.w), pick(args.k, DEFAULTS.k),
                            pick(args.l, DEFAULTS.l), **common)


# The SearchParams fields that have a flag of their own ("--" + the field, dashed).
PARAM_FLAGS = {name for name, _, _ in SAMPLING_FLAGS} | {"method", "w", "k", "l", "beta",
                                                          "seed", "stop", "stop_token_ids",
                                                          "include_stop_str_in_output",
                                                          "allowed_token_ids", "bad_words",
                                                          "structured_output"}


def flag_error(e: InvalidParam, params_rule: bool = False) -> UserError:
    """A refused search parameter as the command's user reads it: by its flag (the params
    and the engine name the field, 'SearchParams.min_p=...' or 'min_p=...'). params_rule:
    SearchParams' own check, whose text names other fields too (not the engine's refusals,
    which may name another server's parameter: 'an OpenAI API, which has no top_k')."""
    message = str(e)
    if e.field in PARAM_FLAGS:
        flag = "--" + e.field.replace("_", "-")
        for name in (f"SearchParams.{e.field}=", f"{e.field}="):
            if message.startswith(name):
                message = f"{flag}={message[len(name):]}"
                break
    if not params_rule:
        return UserError(message)
    # Other fields the message names ("must be at most max_new_tokens (128)"), and the
    # Python API's None, as the command spells them.
    message = re.sub(r"(?<![\w-])(" + "|".join(sorted((n for n in PARAM_FLAGS if "_" in n),
                                                       key=len, reverse=True)) + r")\b",
                     lambda m: "--" + m.group(1).replace("_", "-"), message)
    return UserError(message.replace("or None for a random one", "or leave it out for a "
                                     "random one"))


def checked_params(args):
    """The search parameters the flags give, validated before any model loads; an invalid
    value is named by its flag."""
    params = params_from_args(args)
    try:
        params.validate()
    except InvalidParam as e:
        raise flag_error(e, params_rule=True) from None
    except ValueError as e:
        raise UserError(str(e)) from None
    return params


def cmd_search(args):
    params = checked_params(args)
    if args.stream and len(args.prompts) != 1:
        raise UserError("--stream runs one prompt: give one")
    if args.stream and args.json:
        raise UserError("--stream prints text as it comes, --json the whole results: use one")
    if args.stream and params.samples and params.k > 1:
        raise UserError(f"--stream prints one text, and --method {params.method} --k {params.k} "
                        "draws several: leave --stream out to print them all")
    engine = engine_from_args(args, need_small=params.uses_small_models)
    try:
        run_search(engine, args, params)
    except InvalidParam as e:   # what these models cannot run (EFT over a black box, say)
        raise flag_error(e) from None


def run_search(engine, args, params):
    if args.stream:
        out = sys.stdout
        out.write(args.prompts[0])
        try:
            for delta in engine.search_stream(args.prompts[0], params):
                if delta.index == 0:
                    out.write(delta.text)
                    out.flush()
                if delta.result is not None and delta.result.reward is not None:
                    out.write(f"  [reward {delta.result.reward:+.3f}]")
        finally:
            # The line ends also when the search fails or is interrupted half-way: the
            # error, and the shell's prompt, start a line of their own.
            out.write("\n")
        return
    results = engine.search(args.prompts, params)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    for r in results:
        # A search's answer is its best hypothesis; base and EFT draw k samples: each is one.
        for h in r.hypotheses if params.samples else r.hypotheses[:1]:
            reward = "" if h.reward is None else f"  [reward {h.reward:+.3f}]"
            print(f"{r.prompt}{h.text}{reward}")


def demo_prompts(text: str) -> int:
    value = positive_int(text)
    if value > len(DEMO_PROMPTS):
        raise argparse.ArgumentTypeError(f"the demo has {len(DEMO_PROMPTS)} test prompts: "
                                         f"give 1-{len(DEMO_PROMPTS)}")
    return value


def cmd_demo(args):
    for flag, value, least in (("--max-new-tokens", args.max_new_tokens, 1),
                               ("--seed", args.seed, 0)):
        if value < least:      # before the models load
            raise UserError(f"{flag} {value}: give {least} or more")
    from w2s_engine.tasks.sentiment import run_demo
    run_demo(num_prompts=args.prompts, max_new_tokens=args.max_new_tokens, seed=args.seed)


def cmd_serve(args):
    try:
        from w2s_engine.serve.server import serve
    except ImportError as e:
        raise UserError(f"the server needs the 'serve' extra: pip install 'w2s-engine[serve]' ({e})")
    serve(args)


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default; a help that says its own default keeps it."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = Formatter
    parser = argparse.ArgumentParser(prog="w2s", formatter_class=fmt,
                                     description="Weak-to-strong search: steer a large model with a small tuned/untuned pair.")
    parser.add_argument("--version", action="version", version=f"w2s-engine {w2s_engine.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", formatter_class=fmt, help="search continuations of prompts")
    s.add_argument("prompts", nargs="+", help="one or more prompts")
    add_model_args(s)
    _add_search_args(s)
    s.add_argument("--json", action="store_true", help="print all hypotheses and stats as JSON")
    s.add_argument("--stream", action="store_true",
                   help="print the text as it becomes final (one prompt)")
    s.set_defaults(func=cmd_search)

    d = sub.add_parser("demo", formatter_class=fmt,
                       help="the main job: base, Best-of-16 and CBS on the bundled models")
    d.add_argument("--prompts", type=demo_prompts, default=4,
                   help=f"prompts to run, openings of the held-out test split (at most "
                        f"{len(DEMO_PROMPTS)})")
    d.add_argument("--max-new-tokens", type=int, default=30, help="response length cap")
    d.add_argument("--seed", type=int, default=1, help="same seed, same results")
    d.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                   help="how much the package logs on stderr (error: transformers' loading "
                        "bars and warnings too)")
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("serve", formatter_class=fmt, help="OpenAI-compatible HTTP server")
    add_model_args(v)
    v.add_argument("--host", default="127.0.0.1", help="address to bind")
    v.add_argument("--port", type=port_number, default=8000, help="port to bind")
    v.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $W2S_API_KEY; unset: no key)")
    v.add_argument("--allowed-origins", default=None,
                   help="comma-separated origins a browser may call from (CORS; '*' for any) "
                        "(default: none)")
    v.add_argument("--max-queue", type=nonnegative_int, default=256,
                   help="requests waiting for KV memory before 429 (those that fit run at once)")
    v.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model name(s) in /v1/models; responses carry the first, requests "
                        "may name any (default: --large's base name; never a local path)")
    v.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names to answer ('*' for any) (default: "
                        "the loopback names when bound to loopback, else any)")
    v.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                   help="request body limit; past it the answer is 413")
    v.add_argument("--body-timeout", type=positive_seconds, default=60.0,
                   help="seconds a request's body has to arrive whole after its headers; "
                        "past them the answer is 408 and the connection is closed")
    v.add_argument("--max-prompt-chars", type=positive_int, default=None,
                   help="prompt length limit in characters, checked before tokenizing "
                        "(default: 32 per token of the models' smallest context)")
    v.add_argument("--shutdown-timeout", type=seconds, default=20.0,
                   help="on SIGTERM / Ctrl-C, seconds the requests in flight have to finish; "
                        "then they end (their searches cancelled) and the server exits, "
                        "whatever its clients do")
    v.set_defaults(func=cmd_serve, log_level="info")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        args.func(args)
    except UserError as e:
        print(f"w2s: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError) as e:
        # Model specs, templates and parameters: the engine's message says what to change.
        print(f"w2s: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        from w2s_engine.engine import SearchError
        from w2s_engine.large.openai_completions import RemoteModelError
        if not isinstance(e, (SearchError, RemoteModelError)):
            raise
        # A search the engine failed (a black-box server down, say): what went wrong, no trace.
        print(f"w2s: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        # Ctrl-C: a stop the user asked for, not a failure to report with a trace (the
        # engine gives back every block on the way out); 130, as shells exit on SIGINT.
        print("w2s: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # stdout closed early (| head): quiet, as other commands are; Python's own flush at
        # exit would raise again, so stdout goes to devnull first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
