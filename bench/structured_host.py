"""The host's work for structured outputs, per decode step: what the device waits on.

    python bench/structured_host.py [--beams 16,64,256] [--out DIR]

Before a step samples, each guided beam's matcher fills its bitmask of the vocabulary (one bit
a token) on the host (large/guide.py); after the step, each recorded token advances it, and a
chunk's end forks the survivors' matchers into their children. This times those, for the
bundled models' real vocabularies (SmolLM2's 49k tokens, Gemma 3's 262k), with the matchers in
the middle of a JSON schema's string (where most tokens are allowed: the bitmask's costly
case) and of a regex, and the one-off compiles (the vocabulary's, then a schema's). Appends
JSON lines to <out>/structured_host.jsonl naming the machine and the commit.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import RESULTS, commit, machine  # noqa: E402
from w2s_engine.large.guide import Guides  # noqa: E402
from w2s_engine.models.loader import load_model  # noqa: E402

SCHEMA = {"type": "object", "properties": {"review": {"type": "string"},
                                           "stars": {"type": "integer", "minimum": 1,
                                                     "maximum": 5}},
          "required": ["review", "stars"]}
# (the matcher's state: inside the review's string, where every token but a few is allowed)
PREFIXES = {"json": ('{"review": "A moving film with', " great", {"json": SCHEMA}),
            "regex": ("2024-0", "1", {"regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"})}


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma-3-270m")
    ap.add_argument("--beams", default="16,64,256")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.models.split(","):
        tok = load_model(spec).tokenizer
        vocab = len(tok)
        guides = Guides(tok, vocab, {tok.eos_token_id})
        t = time.perf_counter()
        guides.compiler()
        vocab_s = time.perf_counter() - t
        for kind, (prefix, following, structure) in PREFIXES.items():
            t = time.perf_counter()
            grammar = guides.compile(structure)
            compile_s = time.perf_counter() - t
            root = guides.matcher(grammar, [])
            assert root.accept_string(prefix), (kind, prefix)
            token = tok(following, add_special_tokens=False)["input_ids"][0]
            assert root.fork().accept_token(token), (kind, following)
            for beams in map(int, args.beams.split(",")):
                matchers = [root.fork() for _ in range(beams)]
                guides.bitmask(matchers)     # (xgrammar caches a state's first mask)
                bitmask_s = timed(lambda: guides.bitmask(matchers), args.reps)
                fork_s = timed(lambda: [m.fork() for m in matchers], args.reps)

                def advance():     # one token each, then back (the next rep starts alike)
                    for m in matchers:
                        m.accept_token(token)
                        m.rollback(1)
                advance_s = timed(advance, args.reps)
                row = {"model": spec, "vocab": vocab, "structure": kind, "beams": beams,
                       "bitmask_ms": round(1e3 * bitmask_s, 3),
                       "bitmask_us_per_beam": round(1e6 * bitmask_s / beams, 1),
                       "accept_and_rollback_ms": round(1e3 * advance_s, 3),
                       "fork_ms": round(1e3 * fork_s, 3),
                       "vocabulary_compile_s": round(vocab_s, 3),
                       "structure_compile_s": round(compile_s, 4),
                       "machine": machine(), "commit": commit()}
                print(json.dumps(row), flush=True)
                with (args.out / "structured_host.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
