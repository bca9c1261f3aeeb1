"""Turn bench/kernel_bench.py's pytest-benchmark JSON into a markdown table, the torch path beside.

    python bench/kernels_table.py bench/results/kernels-H200*.json [--markdown OUT.md]

One row per (kernel, shape, impl) that is not a baseline and each baseline of the same kernel
and shape (the torch path, SDPA, the per-head or per-beam kernel): its time, fraction of peak
(HBM bandwidth, or the dense bf16 peak for extend attention), temporaries, and the baseline's
time and temporaries. Several files (gpu_check.sh writes one per group of benchmarks) make one
table; an empty or cut file (a group stopped by its time limit) is named and left out.
"""

import argparse
import json
import sys


def rows(report: dict) -> list[dict]:
    return [b["extra_info"] for b in report.get("benchmarks", []) if "kernel" in b["extra_info"]]


def table(report: dict) -> str:
    infos = rows(report)
    bases = {}
    for r in infos:
        if r.get("baseline"):
            bases.setdefault((r["kernel"], r["shape"]), []).append(r)
    device = next((r["device"] for r in infos), "unknown device")
    header = ("| kernel | shape | impl | ms | of peak | temporaries MB | baseline | baseline ms "
              "| baseline MB | speed-up |")
    out = [f"Kernels on {device} (`bench/kernel_bench.py`; best of 10 after warm-up).", "", header,
           "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in infos:
        if r.get("baseline"):
            continue
        frac = (f"{100 * r['peak_fraction']:.0f}% {r['peak_kind']}" if "peak_fraction" in r
                else "")
        cells = [r["kernel"], r["shape"], r["impl"], f"{r['ms']:.3f}", frac,
                 f"{r['temporaries_mb']:.1f}"]
        for b in bases.get((r["kernel"], r["shape"])) or [None]:
            more = (["", "", "", ""] if b is None else
                    [b["impl"], f"{b['ms']:.3f}", f"{b['temporaries_mb']:.1f}",
                     f"{b['ms'] / r['ms']:.2f}x"])
            out.append("| " + " | ".join(cells + more) + " |")
    return "\n".join(out) + "\n"


def load(paths: list[str]) -> tuple[dict, list[str]]:
    """The benchmarks of every readable file as one report, and the files left out."""
    benchmarks, left_out = [], []
    for path in paths:
        try:
            with open(path) as f:
                benchmarks += json.load(f).get("benchmarks", [])
        except (OSError, ValueError):
            left_out.append(path)
    return {"benchmarks": benchmarks}, left_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON from bench/kernel_bench.py")
    ap.add_argument("--markdown", metavar="OUT.md", help="write the table here (else stdout)")
    args = ap.parse_args(argv)
    report, left_out = load(args.json)
    text = table(report) + "".join(f"\n(left out, empty or cut: {p})\n" for p in left_out)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
