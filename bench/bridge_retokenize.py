"""The cross-tokenizer bridge's host time at a chunk end (search/bridge.py: retokenize_many).

    python bench/bridge_retokenize.py [--streams 256] [--tokens 600]

With different vocabularies, every candidate's small stream is re-tokenized at each chunk end
(a tail window, in one call into the tokenizer for all of them), and the device waits for it:
16 concurrent CBS(4,4,8) requests are 256 streams, a 512-token prompt about 600 tokens each
midway. Word-level tokenizer (bench/e2e.py's), 8 new words a stream; prints the mean time of
one call over 20.
"""

import argparse
import random
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import commit, machine, word_tokenizer  # noqa: E402
from w2s_engine.search.bridge import retokenize_many  # noqa: E402
from w2s_engine.search.tokens import tokenize_many  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=600)
    args = ap.parse_args()
    tok = word_tokenizer(1023)
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(3, 1022)}" for _ in range(n))  # noqa: E731
    texts = [words(args.tokens) for _ in range(args.streams)]
    olds = tokenize_many(tok, texts, True)
    grown = [t + " " + words(8) for t in texts]
    n = 20
    seconds = timeit.timeit(lambda: retokenize_many(tok, True, olds, grown), number=n) / n
    print(f"retokenize_many, {args.streams} streams of {args.tokens} tokens + 8: "
          f"{1e3 * seconds:.2f} ms ({machine()}, {commit()})")


if __name__ == "__main__":
    main()
