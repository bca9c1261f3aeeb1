"""How busy the GPU is during a search: torch.profiler over one CBS search, kernels against wall.

    python bench/profile_step.py --preset gpu [--prompt-len 512] [--max-new 64] [--concurrency 1]

GPU busy = the union of the intervals in which a kernel, copy or memset ran on the device,
over the wall time of the search (both from the profiler's own clock). Prints it with the
kernels that took the most time, the count of kernel launches per decode step, and each
phase's share of the wall time (the engine names its phases: w2s.prefill, w2s.large,
w2s.score), and what the GPU waited on: its idle time per step, charged to the innermost
phase the host was in meanwhile (w2s.select: the GPU idles while the host picks the
survivors; '(between phases)': outside every named phase). Appends a JSON line to
<out>/profile_step.jsonl naming the device and the commit. The target (issue 16): at least
85% busy on an H100/H200.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import RESULTS, add_scheduling_args, arriving, build, commit, eager_scoring, \
    machine, parse_search, prompt_of, scheduling_list, set_async_scheduling, \
    warm_up  # noqa: E402

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as sorted disjoint intervals."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        elif b > a:
            out.append((a, b))
    return out


def overlap_length(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Length of the intersection of two unions of sorted disjoint intervals."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        total += max(0.0, min(xs[i][1], ys[j][1]) - max(xs[i][0], ys[j][0]))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def host_span(events: list, region: str) -> dict:
    """The host's range named `region`: with CUDA activities the profiler also records a
    device-side copy of each annotation (cat gpu_user_annotation, the device's part of it),
    which may come first in the trace."""
    return next(e for e in events if e.get("name") == region and e.get("ph") == "X"
                and e.get("cat") != "gpu_user_annotation")


def busy_outside(trace: dict, region: str, device: list, phase: str) -> float | None:
    """Busy fraction of the region's time outside `phase` (its host and device ranges):
    issue 16's "a profiled decode step", with the prompts' prefill left out."""
    events = trace["traceEvents"]
    span = host_span(events, region)
    lo, hi = span["ts"], span["ts"] + span["dur"]
    out = merged([(max(lo, e["ts"]), min(hi, e["ts"] + e["dur"])) for e in events
                  if e.get("name") == phase and e.get("ph") == "X"])
    wall = (hi - lo) - union_length(out)
    if wall <= 0:
        return None
    busy = merged([(e["ts"], min(hi, e["ts"] + e["dur"])) for e in device])
    return (union_length(busy) - overlap_length(busy, out)) / wall


BETWEEN_PHASES = "(between phases)"
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")   # cudaLaunchKernel, cuLaunchKernel (Triton)


def phase_detail(trace: dict, device: list, phase: str) -> dict | None:
    """Per occurrence of the host phase `phase` (its host ranges): how often it ran, its mean
    host ms, the kernel and graph launches the host made in it, the device's busy ms
    meanwhile, and the CUDA runtime / driver calls the host spent longest in. A phase whose host ms far exceed its device ms with many launches is bound by
    launching (each eager op's Python and launch); few launches and a long host time, by the
    host's own work or a wait. None when the phase never ran."""
    events = trace["traceEvents"]
    spans = merged([(e["ts"], e["ts"] + e["dur"]) for e in events
                    if e.get("ph") == "X" and e.get("name") == phase
                    and e.get("cat") != "gpu_user_annotation"])
    if not spans:
        return None
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATEGORIES
               and any(a <= e["ts"] < b for a, b in spans)]
    inside = sum(1 for e in runtime if "Launch" in str(e.get("name")))
    # The runtime calls the host spent longest in: a synchronize or a blocking copy here is
    # the host waiting for the device inside the phase.
    calls = {}
    for e in runtime:
        calls[e["name"]] = calls.get(e["name"], 0.0) + e["dur"]
    busy = overlap_length(merged([(e["ts"], e["ts"] + e["dur"]) for e in device]), spans)
    n = len(spans)
    return {"occurrences": n, "host_ms": round(union_length(spans) / n / 1e3, 3),
            "launches": round(inside / n, 1), "device_busy_ms": round(busy / n / 1e3, 3),
            "runtime_ms": {k: round(v / n / 1e3, 3)
                           for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:4]}}


def idle_by_phase(trace: dict, region: str, device: list) -> dict[str, float]:
    """The device's idle time inside the trace's `region` range (us), by the innermost w2s.*
    host range open meanwhile (the engine's ranges nest on one thread): what the GPU waited
    on. Time outside every named range goes to BETWEEN_PHASES."""
    events = trace["traceEvents"]
    span = host_span(events, region)
    lo, hi = span["ts"], span["ts"] + span["dur"]
    idle, t = [], lo
    for a, b in merged([(max(lo, e["ts"]), min(hi, e["ts"] + e["dur"])) for e in device]):
        if a > t:
            idle.append((t, a))
        t = max(t, b)
    if t < hi:
        idle.append((t, hi))
    ranges = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
              if e.get("ph") == "X" and str(e.get("name", "")).startswith("w2s.")
              and e.get("cat") != "gpu_user_annotation" and e["ts"] < hi
              and e["ts"] + e["dur"] > lo]
    # Boundaries in time order: (time, kind, payload); kinds apply in any order at one time.
    marks = [(a, "idle", True) for a, _ in idle] + [(b, "idle", False) for _, b in idle]
    marks += [(a, "open", i) for i, (a, _, _) in enumerate(ranges)]
    marks += [(b, "close", i) for i, (_, b, _) in enumerate(ranges)]
    marks.sort(key=lambda m: m[0])
    out, open_ranges, in_idle, prev = {}, [], False, lo
    for t, kind, payload in marks:
        if in_idle and t > prev:
            name = ranges[open_ranges[-1]][2] if open_ranges else BETWEEN_PHASES
            out[name] = out.get(name, 0.0) + t - prev
        prev = max(prev, t)
        if kind == "idle":
            in_idle = payload
        elif kind == "open":
            open_ranges.append(payload)
        else:
            open_ranges.remove(payload)
    return out


def busy_fraction(trace: dict, region: str) -> tuple[float, float, list]:
    """(busy fraction, wall us, device events) of the trace's `region` range."""
    events = trace["traceEvents"]
    span = host_span(events, region)
    lo, hi = span["ts"], span["ts"] + span["dur"]
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES and e.get("ph") == "X"
              and lo <= e["ts"] <= hi]
    busy = union_length([(e["ts"], min(hi, e["ts"] + e["dur"])) for e in device])
    return busy / span["dur"], span["dur"], device


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpu", choices=["cpu", "cpu-shared", "gpu", "gpu-cross"])
    ap.add_argument("--search", default="cbs-4-4-8")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--cascade", action="store_true",
                    help="cascade_attention=True: shared-prefix decode attention")
    ap.add_argument("--eager-scoring", action="store_true",
                    help="no scoring graphs: every scorer's forward eagerly (for comparison)")
    add_scheduling_args(ap)
    ap.add_argument("--arrivals-every", type=int, default=0,
                    help="admit a request every N engine steps instead of all at once (their "
                         "chunks end on different steps)")
    ap.add_argument("--scoring-parts", type=int, default=2,
                    help="EngineConfig.scoring_parts (1: each chunk end scored in one batch)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    assert not (args.cascade and args.no_graphs), "--cascade runs on the static decode path"
    engine, names = build(args.preset, cuda_graphs=not args.no_graphs, cascade=args.cascade,
                          async_scheduling=args.async_scheduling,
                          fused_ops=False if args.no_fused_ops else None)
    if args.eager_scoring:
        eager_scoring(engine)
    engine.config.scoring_parts = args.scoring_parts    # read at each chunk end
    params = parse_search(args.search, args.max_new)
    prompts = [prompt_of(engine.large_tokenizer, args.prompt_len, seed=i)
               for i in range(args.concurrency)]
    schedulings = scheduling_list(args)
    for asynchronous in schedulings:
        set_async_scheduling(engine, asynchronous)
        row = profile_one(engine, names, args, params, prompts)
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "profile_step.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


def profile_one(engine, names, args, params, prompts) -> dict:
    """One profiled search (after warm_up): its row, printed."""
    warm_up(engine, prompts, params, args.arrivals_every)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("w2s_search"):
            results = (arriving(engine, prompts, params, args.arrivals_every)
                       if args.arrivals_every else engine.search(prompts, params))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    busy, wall_us, device = busy_fraction(trace, "w2s_search")
    decode_busy = busy_outside(trace, "w2s_search", device, "w2s.prefill")
    idle = idle_by_phase(trace, "w2s_search", device)
    phases = {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and str(e.get("name", "")).startswith("w2s.") \
                and e.get("cat") != "gpu_user_annotation":
            phases[e["name"]] = phases.get(e["name"], 0.0) + e["dur"]
    steps = args.max_new    # every step decodes one token of every live beam
    by_name = {}
    for e in device:
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + e["dur"]
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    launches = sum(1 for e in device if e.get("cat") == "kernel")
    row = {"preset": args.preset, "large": names["large"], "search": args.search,
           "prompt_len": args.prompt_len, "max_new_tokens": args.max_new,
           "concurrency": args.concurrency, "cuda_graphs": bool(engine.config.cuda_graphs),
           "cascade_attention": bool(engine.config.cascade_attention),
           "scoring_graphs": any(r.scoring_graphs is not None for r in engine.runners.values()),
           "async_scheduling": bool(engine.config.async_scheduling),
           "scoring_ahead": bool(engine.config.async_scheduling and engine.config.scoring_ahead),
           "arrivals_every": args.arrivals_every, "scoring_parts": engine.config.scoring_parts,
           "fused_ops": bool(engine.config.fused_ops),
           "wall_s": round(wall_us / 1e6, 3), "gpu_busy": round(busy, 3),
           "gpu_busy_after_prefill": None if decode_busy is None else round(decode_busy, 3),
           "kernels_per_step": round(launches / steps, 1),
           "phase_share": {k: round(v / wall_us, 3) for k, v in sorted(phases.items())},
           # what the GPU waited on: idle ms per step by the host's innermost phase
           "idle_ms_per_step": {k: round(v / 1e3 / steps, 3)
                                for k, v in sorted(idle.items(), key=lambda kv: -kv[1])},
           # per occurrence: host ms, launches made, device busy ms meanwhile
           "phase_detail": {name: d for name in ("w2s.prefill", "w2s.prefill.large",
                                                 "w2s.prefill.small", "w2s.large",
                                                 "w2s.score.launch", "w2s.select")
                            if (d := phase_detail(trace, device, name)) is not None},
           "sampled": sum(r.stats.tokens_sampled for r in results),
           "top_device_us": {k[:80]: round(v) for k, v in top},
           "device": machine(), "torch": torch.__version__, "commit": commit()}
    if decode_busy is not None:
        print(f"GPU busy outside the prefill: {100 * decode_busy:.1f}%")
    print(f"GPU busy {100 * busy:.1f}% of {wall_us / 1e6:.2f} s; "
          f"{row['kernels_per_step']} device ops per step; device: {row['device']}")
    for name, share in row["phase_share"].items():
        print(f"  {name}: {100 * share:.1f}% of the wall time")
    print("GPU idle per step, by the host's phase meanwhile:")
    for name, ms in row["idle_ms_per_step"].items():
        print(f"  {name}: {ms:.3f} ms")
    print("Per occurrence of a phase: host ms, launches, device busy ms meanwhile:")
    for name, d in row["phase_detail"].items():
        print(f"  {name}: {d['occurrences']} x {d['host_ms']} ms, {d['launches']} launches, "
              f"device busy {d['device_busy_ms']} ms; longest runtime calls {d['runtime_ms']}")
    for name, us in top:
        print(f"  {us / 1e3:9.2f} ms  {name[:100]}")
    return row


if __name__ == "__main__":
    main()
