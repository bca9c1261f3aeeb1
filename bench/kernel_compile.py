"""Every Triton kernel of the engine compiled for an H100/H200 (sm_90) on this machine: no GPU.

    python bench/kernel_compile.py [--out DIR]

The kernel wrappers run on CPU tensors in the engine's real layouts (bf16 and fp32; Llama-3
attention: 32 query heads and 8 kv heads of 128, blocks of 16; sliding windows, soft-caps,
shared prefixes, min-p), with Triton's launches intercepted, so nothing runs. Each launch is
then compiled for sm_90 with every configuration the autotuner would time on the GPU, against
a stand-in driver that only names the target. Per compile it prints the registers, the bytes
spilled per thread, the shared memory and which tensor-core instruction tl.dot became (wgmma,
Hopper's, or the older mma.sync); it exits 1 when a compile fails (on the GPU
that would stop the autotuner, which skips only configurations short of resources) or a
launch has no configuration that fits a block's shared memory, a configuration the autotuner
would time spills more than SPILL_LIMIT bytes a thread, or a kernel that promises torch's
rounding compiled a multiply and an add into one fma. A GPU minute is then not spent finding a kernel
that does not compile. The Triton here (see the header line) may be newer than the GPU
machine's; the interpreter (TRITON_INTERPRET=1) must be off.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from unittest import mock
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)   # compile for real: triton.jit reads it at import

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from w2s_engine.kernels.cascade_attention import (cascade_decode_attention_triton,  # noqa: E402
                                                  find_shared_prefixes)
from w2s_engine.kernels.chunk_reward import (LMHead, chunk_reward_triton,  # noqa: E402
                                             fused_lmhead_chunk_reward_triton,
                                             lmhead_chunk_logprob_triton)
from w2s_engine.kernels.kv_cache import copy_blocks_triton, store_kv_triton  # noqa: E402
from w2s_engine.kernels.paged_attention import (paged_decode_attention_triton,  # noqa: E402
                                                paged_extend_attention_triton)
from w2s_engine.kernels.activation import silu_mul_triton  # noqa: E402
from w2s_engine.kernels.rms_norm import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from w2s_engine.kernels.rotary import rotary_triton  # noqa: E402
from w2s_engine.kernels.sampling import sample_triton  # noqa: E402

SHARED_PER_BLOCK = 227 * 1024      # an H100/H200 block's most shared memory (opt-in)
# Kernels that promise torch's rounding op for op: a multiply and an add contracted into one
# fma round once where torch's two ops round twice (the rotary kernel's were, on an H200: 23%
# of its bf16 outputs one ulp off transformers'). They must compile to no floating fma.
ROUNDS_AS_TORCH = {"_rotary_kernel"}
# Bytes a thread may spill in a configuration the autotuner times. fp32's full-precision dots
# in 128-row tiles spilled 14-32 KB: each such configuration took tens of seconds to compile
# and ran so slowly that autotuning one fp32 extend took minutes on an H200.
SPILL_LIMIT = 2048
BF16, FP32 = torch.bfloat16, torch.float32


@dataclass
class Launch:
    variant: str
    fn: JITFunction
    configs: list | None          # the autotuner's, or None: the launch's own kwargs
    args: tuple
    kwargs: dict
    results: list = field(default_factory=list)


class TargetOnly:
    """A stand-in for Triton's CUDA driver: it names the target; nothing is launched."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def intercepted(launches: list, variant: list):
    """Launches made inside are recorded (with variant[0]) instead of run."""
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(variant[0], self, None, args, kwargs))

    def record_tuner(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        tuned = self.configs    # those the autotuner would time: after its early prune
        if self.early_config_prune:
            tuned = self.early_config_prune(self.configs, dict(zip(self.arg_names, args)),
                                            **kwargs)
        launches.append(Launch(variant[0], self.fn, list(tuned), args, kwargs))

    JITFunction.run, Autotuner.run = record_jit, record_tuner
    try:
        yield jit_run
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run


def attention_inputs(dtype, batch=4, q_heads=32, kv_heads=8, head_dim=128, blocks=64, bs=16):
    q = torch.randn(batch, q_heads, head_dim).to(dtype)
    k_cache = torch.randn(blocks, bs, kv_heads, head_dim).to(dtype)
    tables = torch.arange(batch * 8, dtype=torch.int32).view(batch, 8) % blocks
    lens = torch.full((batch,), 100, dtype=torch.int32)
    return q, k_cache, k_cache.clone(), tables, lens


def recipes():
    """(variant, call) pairs: each call runs a wrapper as the engine does."""
    for dtype in (BF16, FP32):
        name = str(dtype).removeprefix("torch.")

        def store(dtype=dtype):
            k = torch.randn(6, 8, 128).to(dtype)
            cache = torch.zeros(16, 16, 8, 128, dtype=dtype)
            store_kv_triton(k, k.clone(), cache, cache.clone(), torch.arange(6))
        yield f"store_kv {name}", store

        def copy(dtype=dtype):
            pool = torch.zeros(2, 2, 8, 16, 8, 128, dtype=dtype)
            copy_blocks_triton(pool, torch.tensor([0, 1]), torch.tensor([2, 3]))
        yield f"copy_blocks {name}", copy

        # a row in registers, and wider than MAX_ONE_TILE (a loop); Llama's form and Gemma's
        for width, gemma in ((4096, False), (16384, False), (4096, True), (16384, True)):
            def norm(dtype=dtype, width=width, gemma=gemma):
                rms_norm_triton(torch.randn(4, width).to(dtype), torch.ones(width, dtype=dtype),
                                1e-5, unit_offset=gemma)
            yield f"rms_norm {name} {width}{' gemma' if gemma else ''}", norm

            def add_norm(dtype=dtype, width=width, gemma=gemma):
                x = torch.randn(4, width).to(dtype)
                add_rms_norm_triton(x, x.clone(), torch.ones(width, dtype=dtype), 1e-5,
                                    unit_offset=gemma)
            yield f"add_rms_norm {name} {width}{' gemma' if gemma else ''}", add_norm

        def rope(dtype=dtype):     # an 8B Llama's heads: [B, T, H, D] projections as [B, H, T, D]
            q = torch.randn(1, 16, 32, 128).to(dtype).transpose(1, 2)
            k = torch.randn(1, 16, 8, 128).to(dtype).transpose(1, 2)
            cos = torch.randn(1, 16, 128).to(dtype)
            rotary_triton(q, k, cos, cos.clone())
        yield f"rotary {name}", rope

        def act(dtype=dtype):      # an 8B Llama's MLP width
            gate = torch.randn(4, 14336).to(dtype)
            silu_mul_triton(gate, gate.clone())
        yield f"silu_mul {name}", act

        sinks = torch.zeros(32)    # GPT-OSS's attention sinks: one logit per query head
        for window, softcap, start, sink in ((None, None, False, None),
                                             (64, 30.0, False, None), (None, None, True, None),
                                             (64, None, False, sinks)):
            label = f"decode {name}" + (" window+softcap" if softcap else "") + \
                (" kv_start" if start else "") + (" window+sinks" if sink is not None else "")

            def decode(dtype=dtype, window=window, softcap=softcap, start=start, sink=sink):
                q, kc, vc, tables, lens = attention_inputs(dtype)
                paged_decode_attention_triton(
                    q, kc, vc, tables, lens, 0.1, window, softcap, None,
                    torch.full((4,), 32, dtype=torch.int32) if start else None, sink)
            yield label, decode

        def decode_direct(dtype=dtype, sink=sinks):
            # a batch that fills the GPU by itself (64 x 8 kv heads): one split, no merge
            q, kc, vc, tables, lens = attention_inputs(dtype, batch=64)
            paged_decode_attention_triton(q, kc, vc, tables, lens, 0.1, 64, None, None, None,
                                          sink)
        yield f"decode {name} one split window+sinks", decode_direct

        for window, softcap, chunk, sink in ((None, None, 8, None), (None, None, 512, None),
                                             (64, 30.0, 8, None), (64, None, 8, sinks),
                                             (None, None, 16, None)):
            # a scoring chunk (8 tokens a beam: the short-chunk kernel, 4 splits here) and a
            # prefill-sized one (128-row query tiles); 16 tokens: 64 rows, one split
            def extend(dtype=dtype, window=window, softcap=softcap, chunk=chunk, sink=sink):
                _, kc, vc, tables, lens = attention_inputs(dtype)
                lens.fill_(1000)
                tables = torch.arange(4 * 64, dtype=torch.int32).view(4, 64) % kc.shape[0]
                q = torch.randn(4 * chunk, 32, 128).to(dtype)
                cu = torch.arange(0, 5 * chunk, chunk, dtype=torch.int32)
                paged_extend_attention_triton(q, kc, vc, tables, cu, lens, 0.1, window, softcap,
                                              None, sink)
            yield f"extend {name} {chunk} queries" + (" window+softcap" if softcap else "") + \
                (" window+sinks" if sink is not None else ""), extend

        def cascade(dtype=dtype):
            q, kc, vc, tables, lens = attention_inputs(dtype, batch=16)
            tables[:, :6] = tables[0, :6]            # 16 beams share 6 blocks of prompt
            groups = find_shared_prefixes(tables, lens, kc.shape[1])
            assert groups.num_groups == 1
            cascade_decode_attention_triton(q, kc, vc, tables, lens, 0.1, None, None, groups)
        yield f"cascade decode {name}", cascade

        def reward(dtype=dtype):
            a = torch.randn(8, 128256).to(dtype)
            targets = torch.randint(0, 128256, (8,))
            chunk_reward_triton(a, a.clone(), targets, torch.zeros(8, dtype=torch.long), 1)
        yield f"chunk reward {name}", reward

        for softcap in (None, 30.0):
            def lmhead(dtype=dtype, softcap=softcap):
                h = torch.randn(8, 2048).to(dtype)
                w = torch.randn(4096, 2048).to(dtype)
                targets = torch.randint(0, 4096, (8,))
                fused_lmhead_chunk_reward_triton(h, LMHead(w, None, softcap), h.clone(),
                                                 LMHead(w.clone(), None, softcap), targets,
                                                 torch.zeros(8, dtype=torch.long), 1)
            yield f"fused LM-head reward {name}" + (" softcap" if softcap else ""), lmhead

        def logprob(dtype=dtype):
            h = torch.randn(8, 2048).to(dtype)
            w = torch.randn(4096, 2048).to(dtype)
            targets = torch.randint(0, 4096, (8,))
            lmhead_chunk_logprob_triton(h, LMHead(w), targets, torch.zeros(8, dtype=torch.long),
                                        1)
        yield f"one model's LM-head log-prob {name}", logprob

    # 4 rows: 8 vocabulary slices (8 slots in the fast path); 256 rows: 3 (4 slots).
    for min_p, b in ((False, 4), (True, 4), (False, 256)):
        def sampling(min_p=min_p, b=b):
            sample_triton(torch.randn(b, 128256), torch.full((b,), 0.7),
                          torch.full((b,), 50, dtype=torch.int32), torch.full((b,), 0.9),
                          torch.arange(b, dtype=torch.int64), torch.arange(b, dtype=torch.int64),
                          torch.full((b,), 0.05) if min_p else None)
        yield (f"sampling fp32 logits{' min_p' if min_p else ''}"
               f"{f' {b} rows' if b != 4 else ''}"), sampling


def cuobjdump(cubin: bytes, flag: str) -> str | None:
    """cuobjdump's output for a cubin (the tool ships with Triton's CUDA backend); None where
    this Triton has none."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True).stdout


def resources(cubin: bytes) -> dict:
    """Registers, local memory (spills) and static shared memory per thread/block, from the
    cubin; {} where cuobjdump is not there."""
    out = cuobjdump(cubin, "--dump-resource-usage")
    if out is None:
        return {}
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not found:
        return {}
    regs, stack, _, local = map(int, found.groups())
    # Registers that do not fit spill to the thread's stack frame, in local memory.
    return {"registers": regs, "spilled": stack + local}


def mma_kind(kernel) -> str:
    """Which tensor-core instruction tl.dot became: Hopper's wgmma (asynchronous, warpgroup)
    or the older mma.sync, which reaches a fraction of an H100's dense peak; '-' for none."""
    ptx = kernel.asm["ptx"]
    return "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"


def contractions(kernel) -> int:
    """Floating-point fma instructions in the kernel's PTX (contracted multiply-adds, or
    explicit tl.fma)."""
    return len(re.findall(r"\bfma\.rn\.(?:f32|f16|bf16|f64)", kernel.asm["ptx"]))


def switches(kwargs: dict) -> dict:
    """The launch's constexpr switches and block sizes (upper-case names), and warps/stages."""
    return {k: v for k, v in kwargs.items()
            if (k.isupper() or k in ("num_warps", "num_stages")) and not isinstance(v, torch.Tensor)}


def compile_all(launches: list, run, arch: int):
    before = driver._active      # None here: no GPU driver to go back to
    driver.set_active(TargetOnly(arch))
    try:
        for launch in launches:
            for config in launch.configs or [None]:
                kwargs = dict(launch.kwargs)
                if config is not None:
                    kwargs.update(config.all_kwargs())
                t = time.perf_counter()
                row = {"config": {k: v for k, v in switches(kwargs).items()
                                  if config is None or k in config.all_kwargs()}}
                try:
                    kernel = run(launch.fn, *launch.args, grid=(1,), warmup=True, **kwargs)
                    row.update(ok=True, shared=kernel.metadata.shared, mma=mma_kind(kernel),
                               fma=contractions(kernel), **resources(kernel.asm["cubin"]))
                except Exception as e:   # a compile error is what this is here to find
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}")
                row["seconds"] = round(time.perf_counter() - t, 2)
                launch.results.append(row)
    finally:
        driver._active = before


def variants_over_buckets(max_batch: int = 512) -> tuple[dict[str, int], list]:
    """The distinct specializations (each compiled, and autotuned, once per process) that a
    decode step of every graph bucket launches (Llama-3-8B: norms, rotary embedding, KV
    store, attention over a table of 8,192 tokens, activation, sampling of 128,256 logits)
    and a scoring chunk of 8 tokens for every rows bucket (Llama-3.2-1B's attention, 8 kv
    heads of 64, and the reward over its 128,256-token vocabulary), per kernel. A switch or an argument Triton specializes that varies with the
    batch (a split count as a constexpr, a row count of 1 or a multiple of 16) multiplies
    them: every one is compiled in every autotune configuration when the engine captures its
    graphs, or mid-serving. Returns the counts and one launch of each variant."""
    from w2s_engine.models.decode_graphs import batch_buckets
    launches, variant = [], ["buckets"]
    width = 8192 // 16
    large, small = (torch.zeros(64, 16, 8, d, dtype=BF16) for d in (128, 64))
    head = torch.empty(128256, 2048, dtype=BF16)

    def logits_of_shape(self, hidden, lo=0, hi=None, out=None):
        hi = self.weight.shape[0] if hi is None else hi
        return torch.empty(hidden.shape[0], hi - lo, dtype=hidden.dtype)

    with intercepted(launches, variant):
        for b in batch_buckets(max_batch):
            x = torch.zeros(b, 4096, dtype=BF16)
            rms_norm_triton(x, torch.ones(4096, dtype=BF16), 1e-5)
            add_rms_norm_triton(x, x.clone(), torch.ones(4096, dtype=BF16), 1e-5)
            rotary_triton(torch.zeros(1, b, 32, 128, dtype=BF16).transpose(1, 2),
                          torch.zeros(1, b, 8, 128, dtype=BF16).transpose(1, 2),
                          *[torch.zeros(1, b, 128, dtype=BF16)] * 2)
            keys = torch.zeros(b, 8, 128, dtype=BF16)
            store_kv_triton(keys, keys.clone(), large, large.clone(), torch.arange(b) % 1024)
            tables = torch.zeros(b, width, dtype=torch.int32)
            lens = torch.full((b,), 600, dtype=torch.int32)
            paged_decode_attention_triton(torch.zeros(b, 32, 128, dtype=BF16), large, large,
                                          tables, lens, 0.1)
            silu_mul_triton(*[torch.zeros(b, 14336, dtype=BF16)] * 2)
            sample_triton(torch.zeros(b, 128256), torch.full((b,), 0.7),
                          torch.full((b,), 50, dtype=torch.int32), torch.full((b,), 1.0),
                          torch.arange(b, dtype=torch.int64), torch.arange(b, dtype=torch.int64))
            paged_extend_attention_triton(torch.zeros(8 * b, 32, 64, dtype=BF16), small, small,
                                          tables, torch.arange(0, 8 * b + 1, 8, dtype=torch.int32),
                                          lens, 0.1, max_query_len=8)
            # the chunk's reward over a 128,256 vocabulary (its GEMMs' outputs only allocated:
            # nothing runs here but the launches' arguments matter)
            rows = torch.zeros(8 * b, 2048, dtype=BF16)
            ids = torch.zeros(8 * b, dtype=torch.long)
            with mock.patch.object(LMHead, "columns", logits_of_shape):
                fused_lmhead_chunk_reward_triton(rows, LMHead(head), rows, LMHead(head), ids, ids,
                                                 b, bounds_checked=True)
    seen, unique = {}, []
    for launch in launches:
        keys = seen.setdefault(launch.fn.__name__, set())
        key = specialization(launch)
        if key not in keys:
            keys.add(key)
            unique.append(launch)
    return {name: len(keys) for name, keys in seen.items()}, unique


def specialization(launch: Launch, arch: int = 90) -> str:
    """What Triton compiles a launch for: its constexprs, and how it specializes the other
    arguments (an int of 1 or a multiple of 16, a pointer's alignment), from Triton's own
    binder; the constexprs alone where this Triton's binder is not where we look for it."""
    kwargs = dict(launch.kwargs)
    if launch.configs:
        kwargs.update(launch.configs[0].all_kwargs())
    before = driver._active
    driver.set_active(TargetOnly(arch))
    try:
        binder = launch.fn.device_caches[0][4]
        _, spec, _ = binder(*launch.args, debug=False,
                            instrumentation_mode=triton.knobs.compilation.instrumentation_mode,
                            **kwargs)
        return repr(spec)
    except (AttributeError, IndexError, TypeError):
        return repr(sorted(switches(launch.kwargs).items()))
    finally:
        driver._active = before


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write kernel-compile-sm<arch>-triton<version>.json there")
    ap.add_argument("--buckets", action="store_true",
                    help="only count the kernels' compiled variants over every batch bucket "
                         "(decode of Llama-3-8B, scoring chunks of Llama-3.2-1B)")
    ap.add_argument("--only", default="",
                    help="compile only the variants whose name contains this (e.g. 'decode')")
    args = ap.parse_args()
    assert not (args.only and args.out), "--out records every kernel: drop --only"
    if args.buckets:
        counts, unique = variants_over_buckets()
        for name, count in counts.items():
            print(f"{name}: {count} compiled variant(s) over the batch buckets")
        t = time.perf_counter()
        compile_all(unique, JITFunction.run, args.arch)
        print(f"{sum(len(u.results) for u in unique)} compiles (every autotune configuration) "
              f"in {time.perf_counter() - t:.1f} s on this machine; Triton {triton.__version__}, "
              f"sm_{args.arch}")
        return
    launches, variant = [], [""]
    with intercepted(launches, variant) as run:
        for name, call in recipes():
            if args.only in name:
                variant[0] = name
                call()
    # The same kernel with the same switches twice in a variant (the two models' LM heads) is
    # one compile.
    seen, unique = set(), []
    for launch in launches:
        key = (launch.variant, launch.fn.__name__, repr(switches(launch.kwargs)))
        if key not in seen:
            seen.add(key)
            unique.append(launch)
    launches = unique
    compile_all(launches, run, args.arch)
    print(f"Triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}")
    problems, notes = [], []
    for launch in launches:
        fits = [r for r in launch.results if r["ok"] and r["shared"] <= SHARED_PER_BLOCK]
        print(f"\n{launch.variant}: {launch.fn.__name__} {switches(launch.kwargs)}")
        for r in launch.results:
            if r["ok"]:
                print(f"  {r['config']}: {r.get('registers', '?')} registers, "
                      f"{r.get('spilled', '?')} B spilled, {r['shared']} B shared, "
                      f"{r.get('mma', '-')} ({r['seconds']} s)")
            else:
                print(f"  {r['config']}: FAILED {r['error']}")
        where = f"{launch.variant} ({launch.fn.__name__})"
        errors = sum(not r["ok"] for r in launch.results)
        if errors:   # the autotuner skips only resource errors: this one would stop the run
            problems.append(f"{where}: {errors} configuration(s) do not compile")
        spills = [r for r in launch.results if r["ok"] and r.get("spilled", 0) > SPILL_LIMIT]
        if spills:
            problems.append(f"{where}: {len(spills)} configuration(s) spill more than "
                            f"{SPILL_LIMIT} B a thread (smaller tiles, or prune them)")
        if launch.fn.__name__ in ROUNDS_AS_TORCH and any(r.get("fma") for r in launch.results):
            problems.append(f"{where}: compiled with fma, so it does not round as torch's ops "
                            "do (launch it with enable_fp_fusion=False)")
        if not fits:
            problems.append(f"{where}: no configuration fits {SHARED_PER_BLOCK} B of shared "
                            "memory")
        elif len(fits) < len(launch.results) - errors:
            notes.append(f"{where}: {len(launch.results) - errors - len(fits)} configuration(s) "
                         "need more shared memory than a block has (the autotuner skips them)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        # Named by Triton's version too: the GPU machine's may be older than this one's.
        name = f"kernel-compile-sm{args.arch}-triton{triton.__version__}.json"
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
        (args.out / name).write_text(json.dumps(
            {"triton": triton.__version__, "torch": torch.__version__, "arch": args.arch,
             "commit": commit or "unknown",
             "launches": [{"variant": x.variant, "kernel": x.fn.__name__,
                           "switches": switches(x.kwargs), "results": x.results}
                          for x in launches]}, indent=1, default=str))
    print(f"\n{len(launches)} launches, {sum(len(x.results) for x in launches)} compiles for "
          f"sm_{args.arch}")
    for line in notes:
        print("  note: " + line)
    for line in problems:
        print("  PROBLEM: " + line)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
