"""A reward model scored incrementally on paged KV, against rescoring the full text every chunk.

    python bench/scorer_incremental.py [--rm sentiment-rm] [--max-new 64,256] \
        [--searches cbs-4-4-8,bon-16] [--prompt-len 128]

The engine runs the search with scorer=RewardModel(rm): each chunk forwards a candidate's new
tokens and the template's suffix through the reward model, over the KV it already holds.
The baseline is what reward-guided search tools do (huggingface/search-and-learn's PRM runs
with use_cache=False): at every chunk, every candidate's whole rendering of prompt + response
goes through the reward model again, in padded batches (transformers, sdpa). It is replayed
here from the engine's own trace, so both score the same candidates.

Per row: reward-model tokens forwarded and seconds, engine and baseline, and the engine's
whole search time beside it. Appends to bench/results/scorer_incremental.jsonl (machine and
commit named) and rewrites the markdown table beside it.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import commit, machine, parse_search, prompt_of  # noqa: E402
from w2s_engine import Engine  # noqa: E402
from w2s_engine.scoring import RewardModel  # noqa: E402
from w2s_engine.search.bridge import DetokState, Detokenizer  # noqa: E402
from w2s_engine.tasks.sentiment import LARGE, TEMPLATES  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def timed_scoring(engine) -> dict:
    """Wrap the engine's chunk scoring with a clock (the bench's own, not the engine's)."""
    clock = {"seconds": 0.0}
    run = engine.scorer.run

    def run_timed(plans):
        t = time.perf_counter()
        run(plans)
        clock["seconds"] += time.perf_counter() - t
    engine.scorer.run = run_timed
    return clock


@torch.no_grad()
def rescore_every_chunk(engine, result, batch: int = 16) -> tuple[int, float]:
    """(tokens, seconds) of forwarding every candidate's whole rendering at every chunk."""
    loaded = engine.models["reward_model"]
    model, tok = loaded.model, loaded.tokenizer
    model.set_attn_implementation("sdpa")
    template = engine.scorer.templates[0]
    before, after = template.around(tok, result.prompt)
    detok = Detokenizer(engine.large_tokenizer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens, seconds = 0, 0.0
    try:
        for entry in result.trace:
            rows = []
            for c in entry["candidates"]:
                text = detok.update(DetokState(), c["token_ids"], flush=True)
                rows.append(tok(before + text, add_special_tokens=False)["input_ids"]
                            + tok(after, add_special_tokens=False)["input_ids"])
            tokens += sum(len(r) for r in rows)
            t = time.perf_counter()
            for i in range(0, len(rows), batch):
                part = rows[i:i + batch]
                n = max(len(r) for r in part)
                ids = torch.tensor([r + [pad] * (n - len(r)) for r in part])
                mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in part])
                hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                last = torch.tensor([len(r) - 1 for r in part])
                model.score(hidden[torch.arange(len(part)), last])
            seconds += time.perf_counter() - t
    finally:
        from w2s_engine.models.attention import ATTN_IMPLEMENTATION
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return tokens, seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rm", default="sentiment-rm", help="reward model spec")
    ap.add_argument("--max-new", default="64,256")
    ap.add_argument("--searches", default="cbs-4-4-8,bon-16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    engine = Engine(large=LARGE, scorer=RewardModel(args.rm), templates=TEMPLATES,
                    progress=False, cpu_kv_cache_bytes=8 << 30,
                    prefix_caching=False)   # (each run's prompt prefilled, as before)
    clock = timed_scoring(engine)
    prompt = prompt_of(engine.large_tokenizer, args.prompt_len, seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "scorer_incremental.jsonl"
    for max_new in map(int, args.max_new.split(",")):
        for search in args.searches.split(","):
            params = parse_search(search, max_new).copy(trace=True)
            engine.search([prompt], params.copy(max_new_tokens=8))   # warm-up
            clock["seconds"] = 0.0
            t = time.perf_counter()
            result = engine.search([prompt], params)[0]
            wall = time.perf_counter() - t
            base_tokens, base_seconds = rescore_every_chunk(engine, result)
            row = {"search": search, "max_new_tokens": max_new,
                   "prompt_tokens": result.stats.prompt_tokens, "reward_model": args.rm,
                   "engine_rm_tokens": result.stats.tokens_forwarded["reward_model"],
                   "engine_rm_seconds": round(clock["seconds"], 3),
                   "engine_search_seconds": round(wall, 3),
                   "rescore_rm_tokens": base_tokens, "rescore_rm_seconds": round(base_seconds, 3),
                   "token_ratio": round(base_tokens / result.stats.tokens_forwarded["reward_model"], 1),
                   "time_ratio": round(base_seconds / max(clock["seconds"], 1e-9), 1),
                   "chunks": result.stats.chunks, "device": machine(),
                   "torch": torch.__version__, "commit": commit()}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    write_table(out)


def write_table(path: Path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cols = ["search", "prompt_tokens", "max_new_tokens", "engine_rm_tokens", "rescore_rm_tokens",
            "token_ratio", "engine_rm_seconds", "rescore_rm_seconds", "time_ratio",
            "engine_search_seconds", "device", "commit"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
