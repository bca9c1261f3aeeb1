"""The instructions of each loop of a Triton kernel compiled for sm_90, on this machine (no GPU).

    python bench/sass_loops.py "extend bfloat16 512 queries" _extend_kernel [--config 4]

Compiles one launch of bench/kernel_compile.py's recipes (the variant named, the kernel named,
one autotune configuration) and reads its SASS (cuobjdump, shipped with Triton): for each
loop (a backward branch), its instruction count and the most frequent opcodes. A loop that
streams memory or tiles of tl.dot spends the rest of its instructions on address arithmetic,
masks and the softmax; fewer of them per step is what an ALU-bound pass runs faster on. A
static count, not a timing: the GPU's figures come from bench/kernel_bench.py.
"""

import argparse
import collections
import os
import re
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)   # compile for real

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.kernel_compile import TargetOnly, cuobjdump, intercepted, recipes  # noqa: E402


def sass_of(variant: str, kernel: str, config: int, arch: int = 90) -> tuple[str, str]:
    """(the configuration, the SASS text) of one launch compiled for sm_<arch>."""
    launches, name = [], [""]
    with intercepted(launches, name) as run:
        for label, call in recipes():
            if label == variant:
                name[0] = label
                call()
    found = [x for x in launches if x.fn.__name__ == kernel]
    assert found, f"no launch of {kernel} in the recipe {variant!r}"
    launch = found[0]
    driver.set_active(TargetOnly(arch))
    kwargs = dict(launch.kwargs)
    chosen = launch.configs[config] if launch.configs else None
    if chosen is not None:
        kwargs.update(chosen.all_kwargs())
    compiled = run(launch.fn, *launch.args, grid=(1,), warmup=True, **kwargs)
    sass = cuobjdump(compiled.asm["cubin"], "-sass")
    assert sass is not None, "this Triton ships no cuobjdump"
    return str(chosen), sass


def loops(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """(start address, end address, opcode counts) of each backward branch's span."""
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in
            (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines())
            if m]
    out = []
    for addr, text in code:
        target = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            body = [t for a, t in code if start <= a <= addr]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                                      for t in body)
            out.append((start, addr, ops))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", help="a recipe of bench/kernel_compile.py, e.g. 'decode bfloat16'")
    ap.add_argument("kernel", help="the kernel's name, e.g. _decode_split_kernel")
    ap.add_argument("--config", type=int, default=0, help="index of the autotune configuration")
    args = ap.parse_args()
    config, sass = sass_of(args.variant, args.kernel, args.config)
    print(f"{args.variant}: {args.kernel}, {config}; Triton {triton.__version__}, sm_90")
    for start, end, ops in loops(sass):
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(10))
        print(f"  loop {start:#x}-{end:#x}: {sum(ops.values())} instructions; {top}")


if __name__ == "__main__":
    main()
