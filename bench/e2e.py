"""End-to-end benchmark: the engine against the reference-style baseline and plain sampling.

    python bench/e2e.py --preset cpu        # bundled models: Gemma-3-270M + SmolLM2 pair
    python bench/e2e.py --preset cpu-shared # SmolLM2 steering itself (shared vocabulary)
    python bench/e2e.py --preset gpu        # random-init Llama-3-8B + Llama-3.2-1B pair, bf16
    python bench/e2e.py --preset gpu-cross  # random-init Qwen2.5-7B + Llama-3.2-1B pair

Options pick the workload grid (prompt lengths, max_new_tokens, searches, concurrency). Each run
appends a JSON line to bench/results/e2e-<preset>.jsonl (machine, versions, commit), and
--table prints a markdown table of everything in that file.

Per run: wall time, large-model tokens/s, per-request latency p50/p95, tokens forwarded per
model, peak KV blocks per model (and bytes), and the ratios engine / baseline and
CBS / plain sampling of the same W*K streams. On a GPU, each row also gives plain sampling's
step time against the floor of a decode step: reading the large model's weights once at the
device's peak bandwidth (W2S_PEAK_GBPS, else a table: H100 SXM 3350 GB/s, H200 4800 GB/s),
and the floor of CBS / plain sampling: plain sampling's time plus the small models' GEMM
FLOPs (their tokens forwarded, prompts included) at the device's dense bf16 peak
(W2S_PEAK_TFLOPS, else a table: 989 TFLOP/s on an H100 or H200 SXM). No scoring runs faster
than that, so a CBS / plain target below it cannot be met by the engine, only by smaller
small models.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines.reference_cbs import reference_cbs  # noqa: E402
from w2s_engine import Engine, SearchParams  # noqa: E402
from w2s_engine.models.fused_ops import fuse_ops, fused_with, unfuse_ops  # noqa: E402
from w2s_engine.models.runner import ModelShape  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}   # dense, no sparsity

# Real configurations (from the models' published config.json), randomly initialised: weight
# values do not change speed.
LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
LLAMA32_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                  max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, head_dim=64)
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                 max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def device_peak(env: str, table: dict) -> float | None:
    """The device's peak from the environment variable `env`, else `table` by device name;
    None off CUDA or for a device not in the table."""
    import os
    if os.environ.get(env):
        return float(os.environ[env])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in table.items() if k in name), None)


def peak_gbps() -> float | None:
    return device_peak("W2S_PEAK_GBPS", PEAK_GBPS)


def gemm_flops_per_token(model) -> int:
    """2 x the weights of every nn.Linear, the LM head included (tied or not): one token's
    GEMM FLOPs. Attention's own FLOPs are left out, so time from it is a lower bound."""
    return 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def scoring_floor_s(engine, forwarded: dict) -> float | None:
    """Seconds the small models' forwards take at least: their tokens forwarded times their
    GEMM FLOPs per token, at the device's dense bf16 peak (None where it is not known)."""
    tflops = device_peak("W2S_PEAK_TFLOPS", PEAK_BF16_TFLOPS)
    if tflops is None:
        return None
    flops = sum(n * gemm_flops_per_token(engine.runners[role].model)
                for role, n in forwarded.items() if role != "large")
    return flops / (tflops * 1e12)


def weight_read_floor_ms(model) -> float | None:
    """A decode step cannot beat reading every weight once: parameter bytes / peak bandwidth."""
    gbps = peak_gbps()
    if gbps is None:
        return None
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return nbytes / (gbps * 1e9) * 1e3


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).parent).stdout.strip()


def word_tokenizer(vocab_size: int):
    """A whole-word tokenizer over 'w0 .. wN': stands in for a real vocabulary of that size
    (no hub here); decode and re-tokenize are exact, so the cross-vocabulary path is real."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def random_model(cfg: dict, dtype, device, seed):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prompt_of(tokenizer, n_tokens: int, seed: int) -> str:
    """A prompt of about n_tokens tokens of the given tokenizer."""
    g = torch.Generator().manual_seed(seed)
    if hasattr(tokenizer, "vocab_size") and tokenizer.vocab_size > 1000 and \
            "w3" in tokenizer.get_vocab():
        return " ".join(f"w{int(i)}" for i in torch.randint(3, tokenizer.vocab_size, (n_tokens,),
                                                            generator=g))
    words = "the movie was a story of love and war with great acting and a slow plot".split()
    text, i = "", 0
    while len(tokenizer(text)["input_ids"]) < n_tokens:
        text += " " + words[int(torch.randint(0, len(words), (1,), generator=g))]
        i += 1
    return text.strip()


def build(preset: str, cpu_kv_gib: float = 8, cuda_graphs: bool = True, cascade: bool = False,
          torch_compile: bool = False, async_scheduling: bool = False,
          fused_ops: bool | None = None, prefix_caching: bool = False,
          quantization: str | None = None):
    """(engine, baseline models or None, description) for a preset. Prefix caching is off
    unless asked for: the warm-up and every rep search the same prompts, which would read
    their prompts from the cache, unlike the rows before it and the reference baseline."""
    if preset in ("cpu", "cpu-shared"):
        from w2s_engine.tasks.sentiment import PROMPTED_TEMPLATES as TEMPLATES
        large = "gemma-3-270m" if preset == "cpu" else "smollm2-135m-instruct"
        small = "smollm2-135m-instruct"
        engine = Engine(large=large, tuned=small, untuned=small, templates=TEMPLATES,
                        progress=False, cpu_kv_cache_bytes=int(cpu_kv_gib * (1 << 30)),
                        torch_compile=torch_compile, async_scheduling=async_scheduling,
                        fused_ops=fused_ops, prefix_caching=prefix_caching,
                        quantization=quantization,
                        **({"cuda_graphs": True, "cascade_attention": True} if cascade else {}))
        return engine, {"large": large, "small": small}
    assert torch.cuda.is_available(), f"preset {preset} needs a GPU"
    dtype, dev = torch.bfloat16, "cuda"
    large_cfg = LLAMA3_8B if preset == "gpu" else QWEN25_7B
    large_tok = word_tokenizer(large_cfg["vocab_size"])
    small_tok = word_tokenizer(LLAMA32_1B["vocab_size"])
    large = random_model(large_cfg, dtype, dev, 0)
    tuned = random_model(LLAMA32_1B, dtype, dev, 1)
    untuned = random_model(LLAMA32_1B, dtype, dev, 2)
    for m in (large, tuned, untuned):
        m.generation_config.eos_token_id = 2
    engine = Engine((large, large_tok), (tuned, small_tok), (untuned, small_tok),
                    progress=False, kv_cache_memory_fraction=0.5, cuda_graphs=cuda_graphs,
                    cascade_attention=cascade, torch_compile=torch_compile,
                    async_scheduling=async_scheduling, fused_ops=fused_ops,
                    prefix_caching=prefix_caching, quantization=quantization)
    return engine, {"large": "random " + ("Llama-3-8B" if preset == "gpu" else "Qwen2.5-7B"),
                    "small": "random Llama-3.2-1B"}


def eager_scoring(engine):
    """Every extend forward eagerly (the scorers' chunks, every model's prefill), as before
    the extend graphs (for comparison; the memory the engine set aside for them stays set
    aside)."""
    for runner in engine.runners.values():
        runner.scoring_graphs = None


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def arriving(engine, prompts, params, every: int):
    """The prompts' searches with one request admitted every `every` engine steps (as a
    server's arrivals, so that their chunks end on different steps); their results."""
    requests, step = [], 0
    while len(requests) < len(prompts) or engine.has_unfinished():
        if step % every == 0 and len(requests) < len(prompts):
            requests.append(engine.add_request(prompts[len(requests)], params))
        engine.step()
        step += 1
    assert all(r.error is None for r in requests), [r.error for r in requests]
    return [r.result for r in requests]


def warm_up(engine, prompts, params, every: int = 0):
    """Search every prompt for two chunks (16 tokens), so that the row's batch shapes (the
    scorers' graphs, the kernels' autotuning for them) are met before the clock starts: a
    warm-up of one prompt left them to the first timed row of a process (on an H200 at
    024353a, the waiting 16-request row paid them: 11.0 s). every: the row admits a request
    every that many steps, so the warm-up does too, for up to 64 tokens: a prompt prefilled
    alone beside running decodes, and scoring batches of the requests whose chunks end
    together, are shapes that prompts admitted at once never meet (their graphs would be
    captured, and their kernels tuned, inside the timed row)."""
    if every:
        arriving(engine, prompts, params.copy(max_new_tokens=min(64, params.max_new_tokens)),
                 every)
    else:
        engine.search(prompts, params.copy(max_new_tokens=min(16, params.max_new_tokens)))


def extend_captures(engine) -> tuple[int, float]:
    """(extend graphs captured, seconds spent capturing them) over every model so far: the
    scorers' chunks and the prompts' chunks."""
    graphs = [r.scoring_graphs for r in engine.runners.values() if r.scoring_graphs is not None]
    return sum(len(g.graphs) for g in graphs), sum(g.capture_seconds for g in graphs)


def run_engine(engine, prompts, params, reps: int, every: int = 0):
    """Median wall time over reps (after warm_up); returns (seconds, results, latencies,
    (extend graphs captured, capture seconds) inside the timed reps).
    every: admit a request every that many steps instead of all at once."""
    warm_up(engine, prompts, params, every)
    captured_before, capture_s_before = extend_captures(engine)
    times, results, latencies = [], None, []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        results = (arriving(engine, prompts, params, every) if every
                   else engine.search(prompts, params))
        sync()
        times.append(time.perf_counter() - t)
        latencies += [r.stats.seconds for r in results]
    captured, capture_s = extend_captures(engine)
    return (statistics.median(times), results, latencies,
            (captured - captured_before, round(capture_s - capture_s_before, 3)))


def kv_bytes(engine, role: str, blocks: int) -> int:
    runner = engine.runners[role]
    return blocks * ModelShape.of(runner.model).kv_bytes_per_block(engine.config.block_size,
                                                                   runner.dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu", choices=["cpu", "cpu-shared", "gpu", "gpu-cross"])
    ap.add_argument("--prompt-lens", default="128", help="comma list (grid: 128,512)")
    ap.add_argument("--max-new", default="64", help="comma list (grid: 64,256,1024)")
    ap.add_argument("--searches", default="cbs-4-4-8", help="comma list: cbs-W-K-L, bon-N")
    ap.add_argument("--concurrency", default="1", help="comma list (grid: 1,8,32)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--baseline", action="store_true", help="also time the reference baseline")
    ap.add_argument("--baseline-budget", type=float, default=None,
                    help="seconds; stop the baseline after this and project the rest of its chunks")
    ap.add_argument("--cpu-kv-gib", type=float, default=8,
                    help="KV budget on CPU (all pools); admission reserves each request's worst case")
    ap.add_argument("--plot", action="store_true", help="plot time against max_new_tokens")
    ap.add_argument("--table", action="store_true", help="print the results file as a table")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of the results files")
    ap.add_argument("--no-graphs", action="store_true", help="cuda_graphs=False (for comparison)")
    ap.add_argument("--cascade", action="store_true",
                    help="cascade_attention=True: shared-prefix decode attention")
    ap.add_argument("--compile", action="store_true",
                    help="torch_compile=True: every model's forward through torch.compile")
    ap.add_argument("--eager-scoring", action="store_true",
                    help="no scoring graphs: every scorer's forward eagerly (for comparison)")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="EngineConfig.prefix_caching (off here: the reps repeat the prompts)")
    ap.add_argument("--quantization", choices=["fp8"], default=None,
                    help="EngineConfig.quantization: the large model's linears in FP8")
    ap.add_argument("--arrivals-every", type=int, default=0,
                    help="admit a request every N engine steps instead of all at once")
    ap.add_argument("--scoring-parts", default="2",
                    help="EngineConfig.scoring_parts for each row, comma-separated: chunk ends "
                         "with no decode in flight scored in up to this many parts (1: one "
                         "batch); each value on the same engine")
    add_scheduling_args(ap)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"e2e-{args.preset}.jsonl"
    if args.table or args.plot:
        print_table(out) if args.table else plot(out)
        return
    assert not (args.cascade and args.no_graphs), "--cascade runs on the static decode path"
    engine, names = build(args.preset, args.cpu_kv_gib, cuda_graphs=not args.no_graphs,
                          cascade=args.cascade, torch_compile=args.compile,
                          async_scheduling=args.async_scheduling,
                          fused_ops=False if args.no_fused_ops else None,
                          prefix_caching=args.prefix_caching, quantization=args.quantization)
    if args.eager_scoring:
        eager_scoring(engine)
    schedulings = scheduling_list(args)
    for plen in map(int, args.prompt_lens.split(",")):
        for max_new in map(int, args.max_new.split(",")):
            for search in args.searches.split(","):
                for conc in map(int, args.concurrency.split(",")):
                    for asynchronous in schedulings:
                        for parts in map(int, args.scoring_parts.split(",")):
                            set_async_scheduling(engine, asynchronous)
                            engine.config.scoring_parts = parts   # read at each chunk end
                            row = bench_one(engine, names, args, plen, max_new, search, conc)
                            print(json.dumps(row), flush=True)
                            with out.open("a") as f:
                                f.write(json.dumps(row) + "\n")


SCHEDULINGS = {"waiting": (False, False), "async": (True, True),
               "async-scoring-at-once": (True, False)}   # (async_scheduling, scoring_ahead)


def add_scheduling_args(ap):
    """The flags e2e and profile_step share: the scheduling(s) each row runs in, and the
    engine's fused ops off for comparison."""
    ap.add_argument("--async-scheduling", action="store_true",
                    help="async_scheduling=True: step n+1 launched before step n's tokens are read")
    ap.add_argument("--both-schedulings", action="store_true",
                    help="each row waiting and then with async scheduling, on the same engine "
                         "(one model build and capture for both)")
    ap.add_argument("--schedulings", default="",
                    help="each row in these schedulings on the same engine, comma-separated: "
                         "waiting, async, async-scoring-at-once (async scheduling with each "
                         "scoring read in its own step)")
    ap.add_argument("--no-fused-ops", action="store_true",
                    help="fused_ops=False: transformers' own small ops and separate q/k/v and "
                         "gate/up GEMMs (for comparison)")


def scheduling_list(args) -> list[str]:
    """The schedulings each row runs in: --schedulings, --both-schedulings (waiting, async)
    or the one --async-scheduling picks."""
    if args.schedulings:
        names = args.schedulings.split(",")
        unknown = [n for n in names if n not in SCHEDULINGS]
        assert not unknown, f"--schedulings: {unknown} not among {sorted(SCHEDULINGS)}"
        return names
    if args.both_schedulings:
        return ["waiting", "async"]
    return ["async" if args.async_scheduling else "waiting"]


def set_async_scheduling(engine, scheduling: str | bool):
    """Switch an idle engine's scheduling (the large model and the engine read it at each
    step): a name of SCHEDULINGS, or True / False for async / waiting."""
    assert not engine.has_unfinished() and getattr(engine.large, "in_flight", None) is None
    assert engine.scoring_ahead is None
    if isinstance(scheduling, bool):
        scheduling = "async" if scheduling else "waiting"
    on, ahead = SCHEDULINGS[scheduling]
    if hasattr(engine.large, "async_scheduling"):
        engine.large.async_scheduling = on
        engine.config.async_scheduling = on
    engine.config.scoring_ahead = ahead


def parse_search(search: str, max_new: int) -> SearchParams:
    kind, *nums = search.split("-")
    common = dict(max_new_tokens=max_new, temperature=0.7, top_k=50, seed=1, ignore_eos=True)
    if kind == "cbs":
        w, k, l = map(int, nums)
        return SearchParams.cbs(w, k, l, **common)
    return SearchParams.best_of_n(int(nums[0]), **common)


def bench_one(engine, names, args, plen, max_new, search, conc) -> dict:
    params = parse_search(search, max_new)
    tok = engine.large_tokenizer
    prompts = [prompt_of(tok, plen, seed=i) for i in range(conc)]
    ahead_before = engine.stats()["scorings_ahead"]
    seconds, results, lat, timed_captures = run_engine(engine, prompts, params, args.reps,
                                                       args.arrivals_every)
    scorings_ahead = engine.stats()["scorings_ahead"] - ahead_before
    sampled = sum(r.stats.tokens_sampled for r in results)
    # The floor: plain sampling of the same W*K streams, same engine, no small models.
    base = SearchParams.base(n=params.w * params.k, max_new_tokens=max_new, temperature=0.7,
                             top_k=50, seed=1, ignore_eos=True)
    base_seconds, _, _, _ = run_engine(engine, prompts, base, args.reps, args.arrivals_every)
    forwarded, peak = {}, {}
    for r in results:
        for role, n in r.stats.tokens_forwarded.items():
            forwarded[role] = forwarded.get(role, 0) + n
        for role, n in r.stats.peak_kv_blocks.items():
            peak[role] = max(peak.get(role, 0), n)
    large_prompt = len(tok(prompts[0])["input_ids"])
    ideal_tokens = large_prompt + params.w * params.k * max_new
    row = {
        "preset": args.preset, "large": names["large"], "small": names["small"],
        "prompt_tokens": large_prompt, "max_new_tokens": max_new, "search": search,
        "concurrency": conc, "arrivals_every": args.arrivals_every,
        "seconds": round(seconds, 3),
        "large_tokens_per_s": round(sampled / seconds, 1),
        "latency_p50_s": round(statistics.median(lat), 3),
        "latency_p95_s": round(sorted(lat)[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
        "tokens_forwarded": forwarded, "peak_kv_blocks": peak,
        "peak_kv_bytes_large": kv_bytes(engine, "large", peak.get("large", 0)),
        "peak_kv_vs_ideal_large": round(peak.get("large", 0) * engine.config.block_size
                                        / ideal_tokens, 3),
        "plain_sampling_seconds": round(base_seconds, 3),
        "cbs_over_sampling": round(seconds / base_seconds, 3),
        # Plain sampling of W*K streams per request: one decode step per new token.
        "plain_step_ms": round(1e3 * base_seconds / max_new, 3),
        "cuda_graphs": bool(engine.config.cuda_graphs),
        "graphs_captured": len(getattr(engine.runners["large"].graphs, "graphs", {}) or {}),
        "capture_error": getattr(engine.runners["large"].graphs, "capture_error", None),
        # The extend graphs (from 1a14841 every model's: the scorers' chunks and every
        # prompt's chunks): whether they ran, shapes captured, failures; the large model's
        # (its prefills) also on their own.
        "scoring_graphs": any(r.scoring_graphs is not None for r in engine.runners.values()),
        "prefill_graphs_captured": len(getattr(engine.runners["large"].scoring_graphs,
                                               "graphs", {}) or {}),
        "scoring_graphs_captured": sum(len(r.scoring_graphs.graphs) for r in engine.runners.values()
                                       if r.scoring_graphs is not None),
        "scoring_capture_seconds": round(sum(r.scoring_graphs.capture_seconds
                                             for r in engine.runners.values()
                                             if r.scoring_graphs is not None), 3),
        # ... of which inside this row's timed reps (after its warm-up): a shape first met
        # there, its eager run, capture and kernel tuning timed with the row
        "extend_graphs_captured_in_row": timed_captures[0],
        "extend_capture_seconds_in_row": timed_captures[1],
        "scoring_capture_failed": sorted({why for r in engine.runners.values()
                                          if r.scoring_graphs is not None
                                          for why in r.scoring_graphs.failed.values()}),
        "cascade_attention": bool(engine.config.cascade_attention),
        "torch_compile": bool(engine.config.torch_compile),
        "async_scheduling": bool(engine.config.async_scheduling),
        "prefix_caching": engine.config.prefix_caching,
        "quantization": engine.config.quantization,
        "scoring_ahead": bool(engine.config.async_scheduling and engine.config.scoring_ahead),
        "scorings_read_ahead": scorings_ahead,   # batches read a step later, warm-up and reps
        "scoring_parts": engine.config.scoring_parts,
        "fused_ops": bool(engine.config.fused_ops),
        "device": machine(), "torch": torch.__version__, "commit": commit(),
    }
    floor = weight_read_floor_ms(engine.runners["large"].model)
    if floor is not None:
        row["weight_read_floor_ms"] = round(floor, 3)
        row["plain_step_over_floor"] = round(row["plain_step_ms"] / floor, 2)
    small_floor = scoring_floor_s(engine, forwarded)
    if small_floor is not None:
        row["small_models_flop_floor_s"] = round(small_floor, 3)
        row["cbs_over_sampling_floor"] = round((base_seconds + small_floor) / base_seconds, 3)
    if args.baseline and conc == 1 and search.startswith("cbs"):
        row.update(bench_baseline(engine, prompts[0], params, args.baseline_budget))
        row["engine_speedup_vs_baseline"] = round(row["baseline_seconds"] / seconds, 2)
    return row


def project_baseline_seconds(prefill_s, chunk_s, chunk_len, max_new, l) -> float:
    """Time the baseline would take to reach max_new tokens, from its first chunks: measured
    chunks as they are, the rest from a least-squares line of chunk seconds against response
    length. Each chunk's cost is convex in the length (the rescoring's attention is quadratic),
    so the line tends to extrapolate low. Checked on the full 256-token run (prompt 512, 32
    chunks): from its first 8 / 10 / 16 chunks it projects -13% / +3% / -3% of the measured."""
    x = torch.tensor(chunk_len[1:], dtype=torch.float64)    # the first chunk also warms up
    y = torch.tensor(chunk_s[1:], dtype=torch.float64)
    assert len(x) >= 3, "too few chunks measured to project; raise --baseline-budget"
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    intercept = y.mean() - slope * x.mean()
    rest = [min(n, max_new) for n in range(chunk_len[-1] + l, max_new + l, l)]
    return prefill_s + sum(chunk_s) + sum(float(intercept + slope * n) for n in rest)


def bench_baseline(engine, prompt, params, budget_s=None) -> dict:
    m = {role: engine.runners[role].model for role in ("large", "tuned", "untuned")}
    fused = {}    # the baseline runs plain transformers: the engine's kernels go meanwhile
    for role, model in m.items():
        kernels = fused_with(model)
        if unfuse_ops(model):
            fused[role] = kernels
    for model in m.values():
        model.set_attn_implementation("sdpa")
    try:
        sync()
        t = time.perf_counter()
        _, _, stats = reference_cbs(
            m["large"], engine.large_tokenizer, m["tuned"], m["untuned"],
            engine.models["tuned"].tokenizer, prompt, params.w, params.k, params.l,
            params.max_new_tokens, params.temperature, params.top_k, seed=1,
            device=engine.config.device, time_budget_s=budget_s)
        sync()
        row = {"baseline_seconds": round(time.perf_counter() - t, 3),
               "baseline_tokens_forwarded": stats.tokens_forwarded,
               "baseline_peak_kv_bytes_large": stats.peak_kv_bytes_large,
               "baseline_prefill_seconds": round(stats.prefill_seconds, 3),
               "baseline_chunk_seconds": [round(c, 3) for c in stats.chunk_seconds],
               "baseline_chunk_lengths": stats.chunk_lengths}
        if not stats.completed:
            # Cut short: baseline_seconds becomes the projection (flagged), and the tokens
            # forwarded and peak KV are those of the chunks that ran.
            row["baseline_measured_seconds"] = row["baseline_seconds"]
            row["baseline_seconds"] = round(project_baseline_seconds(
                stats.prefill_seconds, stats.chunk_seconds, stats.chunk_lengths,
                params.max_new_tokens, params.l), 3)
            row["baseline_projected"] = True
        return row
    finally:
        from w2s_engine.models.attention import ATTN_IMPLEMENTATION
        for role, model in m.items():
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
            if role in fused:
                fuse_ops(model, *fused[role])


def print_table(path: Path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cols = ["search", "prompt_tokens", "max_new_tokens", "concurrency", "seconds",
            "large_tokens_per_s", "latency_p50_s", "latency_p95_s", "cbs_over_sampling",
            "cbs_over_sampling_floor", "engine_speedup_vs_baseline", "peak_kv_vs_ideal_large", "plain_step_over_floor",
            "cuda_graphs", "cascade_attention", "torch_compile", "async_scheduling",
            "scoring_ahead", "scoring_parts", "fused_ops", "quantization",
            "arrivals_every", "device", "commit"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [str(r.get(c, "-")) for c in cols]
        if r.get("baseline_projected"):     # from the chunks that ran
            cells[cols.index("engine_speedup_vs_baseline")] = \
                f"{r['engine_speedup_vs_baseline']} (projected)"
        print("| " + " | ".join(cells) + " |")


def plot(path: Path):
    """Seconds against max_new_tokens, engine against baseline, one line per (search, prompt)
    for single requests; projected baseline points are hollow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["concurrency"] == 1 and r["search"].startswith("cbs")]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, key in enumerate(sorted({(r["search"], r["prompt_tokens"]) for r in rows})):
        group = sorted((r for r in rows if (r["search"], r["prompt_tokens"]) == key),
                       key=lambda r: r["max_new_tokens"])
        group = list({r["max_new_tokens"]: r for r in group}.values())   # latest per length
        color = f"C{i}"
        label = f"{key[0]}, prompt {key[1]}"
        ax.plot([r["max_new_tokens"] for r in group], [r["seconds"] for r in group], "o-",
                color=color, label=f"engine, {label}")
        base = [r for r in group if "baseline_seconds" in r]
        ax.plot([r["max_new_tokens"] for r in base], [r["baseline_seconds"] for r in base], "--",
                color=color, label=f"baseline, {label}")
        for r in base:
            ax.plot(r["max_new_tokens"], r["baseline_seconds"], "o", color=color,
                    fillstyle="none" if r.get("baseline_projected") else "full")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("max_new_tokens")
    ax.set_ylabel("seconds, one request")
    first = rows[0] if rows else {}
    ax.set_title(f"{first.get('large', '')} + {first.get('small', '')} pair\n"
                 f"{first.get('device', '')}, torch {first.get('torch', '')}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print("wrote", path.with_suffix(".png"))


if __name__ == "__main__":
    main()
