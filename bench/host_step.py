"""The host's share of an engine step: what the GPU waits on between its kernels.

    python bench/host_step.py [--concurrency 16] [--cross] [--profile]

On a GPU a decode step of a big batch takes a few milliseconds; the Python that packs the
batch, draws the sampling parameters, appends KV slots, records tokens and turns chunks into
scoring rows runs before or after it, and the GPU idles meanwhile (issue 16: GPU busy >= 85%).
This runs the engine's whole loop with tiny random Llama models (hidden 32, one layer, a
1,024-word vocabulary, fp32, on the CPU), so that the models' arithmetic is a small part of
each step and what remains is mostly that host work; it is an upper bound on the host time per step (the CPU reference
kernels are in it too). 16 concurrent CBS(4,4,8) requests = 256 beams per step, prompt 64,
64 tokens each, EOS ignored. Reports the median wall time of the decode-only steps and of
the steps that also score a chunk, and the host's share of each: the step less the time
inside the device's stand-ins (the models' forwards, the LM head, sampling, the reward
kernels), which a GPU runs as kernels while the host goes on, except at a chunk's end, where
the host's reading, scoring bookkeeping, selection and forking sit between the device's last
decode and its next; appends a JSON line to <out>/host_step.jsonl naming the machine and the
commit. --prompt-len 512 --max-new 256 is bench/e2e.py's GPU shape (the host's bookkeeping
grows with each beam's history). --profile prints the engine's functions by their own time.
"""

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import RESULTS, commit, machine, parse_search, prompt_of, random_model, \
    word_tokenizer  # noqa: E402
from w2s_engine import Engine  # noqa: E402

VOCAB = 1024
TINY = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
            max_position_embeddings=4096)


def build(cross: bool, static: bool = True, async_scheduling: bool = False,
          scoring_ahead: bool = True, scoring_parts: int = 2) -> Engine:
    """Tiny large, tuned and untuned models; cross: the small pair has another vocabulary (the
    bridge re-tokenizes every chunk's text); static: decode on the static buffers a GPU's
    graphs replay (run eagerly here), so the host packs each step as it does on a GPU;
    async_scheduling: each step launched before the previous step's tokens are read;
    scoring_ahead: with it, a scoring behind a decode step read the next step."""
    large_tok = word_tokenizer(VOCAB)
    small_tok = word_tokenizer(VOCAB - 1) if cross else large_tok
    models = [random_model(TINY, torch.float32, "cpu", seed) for seed in range(3)]
    for m in models:
        m.generation_config.eos_token_id = 2
    return Engine((models[0], large_tok), (models[1], small_tok), (models[2], small_tok),
                  progress=False, cpu_kv_cache_bytes=1 << 30, cuda_graphs=static,
                  async_scheduling=async_scheduling, scoring_ahead=scoring_ahead,
                  scoring_parts=scoring_parts, prefix_caching=False)   # (the reps' prompts repeat)


class DeviceStandIns:
    """Time spent inside what a GPU runs as kernels or graph replays (the models' forwards,
    the LM head, sampling, the reward kernels): on this CPU they run eagerly in the step; a
    step's wall time less this is its host work, which a GPU waits on at a chunk's end."""

    def __init__(self):
        import w2s_engine.large.local as local
        import w2s_engine.models.runner as runner
        import w2s_engine.search.small_stream as small_stream
        self.seconds, self.depth = 0.0, 0
        for owner, name in [(runner.ModelRunner, "forward"), (runner.ModelRunner, "compute_logits"),
                            (local, "sample"), (small_stream, "fused_lmhead_chunk_reward"),
                            (small_stream, "lmhead_chunk_logprob")]:
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            self.depth += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if not self.depth:     # nested stand-ins counted once
                    self.seconds += time.perf_counter() - t
        return timed


def timed_steps(engine: Engine, prompts, params, every: int = 0,
                device: DeviceStandIns | None = None) -> dict[str, list[float]]:
    """Run the requests to the end, all admitted at once, or one every `every` steps (as a
    server's arrivals: their chunks end on different steps). Seconds per step: "decode"
    (decode-only steps) and "scoring" (steps that also score a chunk), wall time; with
    `device`, "decode_host" and "scoring_host" too: the same steps less their device stand-ins."""
    requests = [] if every else [engine.add_request(p, params) for p in prompts]
    out = {"decode": [], "scoring": [], "decode_host": [], "scoring_host": []}
    step = 0
    while len(requests) < len(prompts) or not all(r.status.ended for r in requests):
        if every and step % every == 0 and len(requests) < len(prompts):
            requests.append(engine.add_request(prompts[len(requests)], params))
        step += 1
        scored = sum(r.stats.tokens_scored for r in requests)
        on_device = device.seconds if device else 0.0
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        kind = "scoring" if sum(r.stats.tokens_scored for r in requests) > scored else "decode"
        out[kind].append(dt)
        if device:
            out[kind + "_host"].append(dt - (device.seconds - on_device))
    assert all(r.error is None for r in requests), [r.error for r in requests]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--search", default="cbs-4-4-8")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--cross", action="store_true", help="the small pair has another vocabulary")
    ap.add_argument("--packed", action="store_true",
                    help="decode on packed lists (the eager path) instead of the static buffers")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="launch each decode step before reading the previous step's tokens")
    ap.add_argument("--scoring-at-once", action="store_true",
                    help="with --async-scheduling: read each scoring in its own step")
    ap.add_argument("--arrivals-every", type=int, default=0,
                    help="admit a request every N steps instead of all at once")
    ap.add_argument("--scoring-parts", type=int, default=2,
                    help="EngineConfig.scoring_parts (1: each chunk end scored in one batch)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    engine = build(args.cross, static=not args.packed, async_scheduling=args.async_scheduling,
                   scoring_ahead=not args.scoring_at_once, scoring_parts=args.scoring_parts)
    params = parse_search(args.search, args.max_new)
    prompts = [prompt_of(engine.large_tokenizer, args.prompt_len, seed=i)
               for i in range(args.concurrency)]
    engine.search(prompts[:1], params.copy(max_new_tokens=16))   # warm-up
    device = DeviceStandIns()
    times = {}
    ahead_before = engine.stats()["scorings_ahead"]
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        gc.disable()   # a collection would be charged to whatever function it lands in
    for _ in range(args.reps):
        if profiler:
            profiler.enable()
        for kind, seconds in timed_steps(engine, prompts, params, args.arrivals_every,
                                         device).items():
            times.setdefault(kind, []).extend(seconds)
        if profiler:
            profiler.disable()
    decode, scoring = times["decode"], times["scoring"]
    engine.check_all_free()
    beams = args.concurrency * params.w * params.k
    row = {"search": args.search, "concurrency": args.concurrency, "beams": beams,
           "cross_vocabulary": args.cross, "static_decode": not args.packed,
           "async_scheduling": args.async_scheduling,
           "scoring_ahead": args.async_scheduling and not args.scoring_at_once,
           "arrivals_every": args.arrivals_every, "scoring_parts": args.scoring_parts,
           "steps_per_rep": (len(decode) + len(scoring)) // args.reps,
           "scorings_ahead_per_rep": (engine.stats()["scorings_ahead"] - ahead_before)
           // args.reps,
           "prompt_len": args.prompt_len,
           "max_new_tokens": args.max_new, "reps": args.reps,
           "decode_step_ms": round(1e3 * statistics.median(decode), 2),
           "scoring_step_ms": round(1e3 * statistics.median(scoring), 2),
           # the same steps less the time inside the models' forwards, the LM head, sampling
           # and the reward kernels (a GPU's kernels and graph replays): the host's share
           "decode_host_ms": round(1e3 * statistics.median(times["decode_host"]), 2),
           "scoring_host_ms": round(1e3 * statistics.median(times["scoring_host"]), 2),
           "device": machine(), "torch": torch.__version__, "commit": commit()}
    print(f"{beams} beams: decode step {row['decode_step_ms']} ms, step with scoring "
          f"{row['scoring_step_ms']} ms (median of {len(decode)} and {len(scoring)}); host's "
          f"share {row['decode_host_ms']} and {row['scoring_host_ms']} ms ("
          f"{row['device']}, {row['commit']})")
    if profiler:
        stats = pstats.Stats(profiler)
        own = sorted(((tt, f"{fn.split('w2s_engine/')[-1]}:{name}")
                      for (fn, _, name), (_, _, tt, _, _) in stats.stats.items()
                      if "w2s_engine/" in fn), reverse=True)[:30]
        steps = len(decode) + len(scoring)
        for tt, name in own:
            print(f"  {1e3 * tt / steps:7.3f} ms/step  {name}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "host_step.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
