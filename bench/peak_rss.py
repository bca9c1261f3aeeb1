"""Peak resident memory of concurrent searches on the CPU: what a CPU user's process holds.

    python bench/peak_rss.py [--templates one|two] [--vocab 49152] [--concurrency 16]

Tiny random Llama models (hidden 32, one layer) with a real-sized small vocabulary (49,152
words, SmolLM2's), so that the scoring's [rows, vocabulary] work dominates what a step
allocates: 16 concurrent CBS(4,4,8) searches score 2,048 rows a chunk. --templates two puts
the tuned and untuned models under different templates (two streams, one model's log-probs
each, as in the demo); one scores both on one stream. Prints the process's peak RSS after a
warm-up search and after the measured one (the difference is mostly KV pages touched for the
first time and the allocator's heap), and appends a JSON line to <out>/peak_rss.jsonl naming
the machine and the commit.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import RESULTS, commit, machine, parse_search, prompt_of, random_model, \
    word_tokenizer  # noqa: E402
from w2s_engine import Engine  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--templates", choices=["one", "two"], default="two")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--search", default="cbs-4-4-8")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    tiny = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=args.vocab,
                max_position_embeddings=4096)
    tok = word_tokenizer(args.vocab)
    models = [random_model(tiny, torch.float32, "cpu", seed) for seed in range(3)]
    for m in models:
        m.generation_config.eos_token_id = 2
    templates = ({"tuned": "w5 w6 {prompt}", "untuned": "{prompt}"} if args.templates == "two"
                 else {"small": "{prompt}"})
    engine = Engine((models[0], tok), (models[1], tok), (models[2], tok), progress=False,
                    cpu_kv_cache_bytes=1 << 30, templates=templates)
    assert len(engine.scorer.streams) == (2 if args.templates == "two" else 1)
    params = parse_search(args.search, args.max_new)
    prompts = [prompt_of(tok, 64, seed=i) for i in range(args.concurrency)]
    engine.search(prompts[:1], params.copy(max_new_tokens=8))
    warm = peak_rss_mib()
    t = time.perf_counter()
    engine.search(prompts, params)
    seconds = time.perf_counter() - t
    row = {"templates": args.templates, "vocab": args.vocab, "concurrency": args.concurrency,
           "search": args.search, "max_new_tokens": args.max_new,
           "peak_rss_after_warmup_mib": round(warm), "peak_rss_mib": round(peak_rss_mib()),
           "seconds": round(seconds, 2), "device": machine(), "torch": torch.__version__,
           "commit": commit()}
    print(f"{args.templates} template(s): peak RSS {row['peak_rss_mib']} MiB (after the warm-up "
          f"{row['peak_rss_after_warmup_mib']} MiB), search {row['seconds']} s "
          f"({row['device']}, {row['commit']})")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "peak_rss.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
