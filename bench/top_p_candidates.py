"""How many candidates the sampling kernel's whole-row path selects among, for top-p alone.

    python bench/top_p_candidates.py

A top-p row without top-k is sampled by one program over its whole row
(kernels/sampling.py, _sample_kernel): a pass finds the max and the softmax mass, a lower
bound on the nucleus's threshold packs the tokens at or above it (the candidates), and eight
radix-select passes over those find the exact cutoff. The selects' work is the candidates'
count, so the bound is what the path's time turns on. This recomputes, in float64 on the
CPU, the bound each rule gives at bench/kernel_bench.py's shapes (128,256 tokens, top_p 0.9;
Gaussian logits x 3 and a Zipf-shaped row, at T 0.7 as there and at T 1): the rule up to
111ea9f (the loose bound, raised by the 256 group maxima) and the kernel's now (raised by the
lane maxima, else by 16 levels of mass). A count of work, not a time: the times need a GPU.
"""

import math

import torch

V, P, LANES, GROUPS, LEVELS = 128256, 0.9, 4096, 256, 16


def raised_by(maxima, m, target):
    """The largest e whose maxima >= e hold `target` of the mass (exp(x - m)), or None."""
    s = maxima.sort(descending=True).values
    hit = ((s - m).exp().cumsum(0) >= target).nonzero()
    return s[hit[0, 0]].item() if len(hit) else None


def bounds(x):
    m, z = x.max(), (x - x.max()).exp().sum()
    target = P * z * 1.001                       # the kernel's margin for rounding
    lo = (m + math.log((1 - P) * z / V) - 1).item()
    lane_max = torch.cat([x, x.new_full(((-V) % LANES,), float("-inf"))]).view(-1, LANES).amax(0)
    group = raised_by(lane_max.view(GROUPS, -1).amax(1), m, target)
    before = lo if group is None else max(lo, group)
    lane = raised_by(lane_max, m, target)
    if lane is not None:
        return before, max(lo, lane), "lane maxima"
    levels = [(m - (j + 1) * (m - lo) / LEVELS).item() for j in range(LEVELS)]
    mass = [(x[x >= e] - m).exp().sum() for e in levels]
    first = next((j for j in range(LEVELS) if mass[j] >= target), None)
    return before, lo if first is None else max(lo, levels[first]), f"level {first}"


def main():
    g = torch.Generator().manual_seed(0)
    rows = {"Gaussian x 3": torch.randn(V, generator=g, dtype=torch.float64) * 3,
            "Zipf 1.1": -1.1 * (torch.rand(V, generator=g).argsort() + 1).double().log()}
    print("| logits | T | nucleus | candidates, 111ea9f | candidates, now | bound |")
    print("|---|---|---:|---:|---:|---|")
    for name, logits in rows.items():
        for t in (0.7, 1.0):
            x = logits / t
            probs = x.sort(descending=True).values.softmax(0)
            nucleus = int((probs.cumsum(0) - probs < P).sum())
            before, now, how = bounds(x)
            print(f"| {name} | {t} | {nucleus:,} | {int((x >= before).sum()):,} | "
                  f"{int((x >= now).sum()):,} | {how} |")


if __name__ == "__main__":
    main()
