"""The device kernels one decoder forward launches, with transformers' ops and with the
engine's fused kernels (models/fused_ops.py): counted, not timed, so any machine can run it.

    python bench/op_count.py [--preset llama-3-8b] [--tokens 16]

The fused column also merges the q/k/v and the gate/up projections into one GEMM each.
A random model with the preset's layer count, heads and activation but a small hidden size
(the count does not depend on the width) runs one forward of `tokens` new tokens (a decode
step of that many beams, packed as the engine packs them: one sequence of new tokens) through
transformers' sdpa attention. A TorchDispatchMode counts the aten ops that launch a kernel on
a GPU (views and allocations excluded). With the fused ops, each kernel call counts as one
launch (its wrapper only allocates its output and launches it; the call runs the PyTorch
reference here, uncounted). Appends a JSON line to <out>/op_count.jsonl naming the machine and
the commit.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import RESULTS, commit, machine  # noqa: E402
from w2s_engine.kernels.activation import silu_mul_ref  # noqa: E402
from w2s_engine.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref  # noqa: E402
from w2s_engine.kernels.rotary import rotary_ref  # noqa: E402
from w2s_engine.models.fused_ops import fuse_ops  # noqa: E402

PRESETS = {   # layers, query heads, kv heads, head dim, model type
    "llama-3-8b": dict(model_type="llama", num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=8),
    "llama-3.2-1b": dict(model_type="llama", num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=8),
    "qwen2.5-7b": dict(model_type="qwen2", num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, head_dim=8),
    "gemma-3-270m": dict(model_type="gemma3_text", num_hidden_layers=18, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=8),
}
# aten ops that launch nothing: views, metadata, allocations
NO_KERNEL = {"view", "_unsafe_view", "transpose", "t", "unsqueeze", "squeeze", "slice",
             "expand", "as_strided", "alias", "reshape", "permute", "select", "detach",
             "empty", "empty_strided", "empty_like", "split", "split_with_sizes", "unbind",
             "lift_fresh",
             "_to_copy_noop", "sym_size", "sym_stride", "is_same_size", "clone_noop"}


class KernelCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.paused = 0      # inside a fused kernel's call: one launch, counted by its name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def one_launch(fn, mode: KernelCount, name: str):
    def call(*args, **kwargs):
        mode.ops[name] += 1
        mode.paused += 1
        try:
            return fn(*args, **kwargs)
        finally:
            mode.paused -= 1
    return call


def count(preset: str, tokens: int, fused: bool, dtype: torch.dtype) -> Counter:
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(PRESETS[preset])
    heads = cfg["num_attention_heads"]
    config = AutoConfig.for_model(cfg.pop("model_type"), hidden_size=heads * cfg["head_dim"],
                                  intermediate_size=4 * heads * cfg["head_dim"], vocab_size=256,
                                  **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                             attn_implementation="sdpa").eval()
    mode = KernelCount()
    if fused:
        fuse_ops(model, norm=one_launch(rms_norm_ref, mode, "w2s rms_norm"),
                 rope=one_launch(rotary_ref, mode, "w2s rotary"),
                 act=one_launch(silu_mul_ref, mode, "w2s silu_mul"),
                 add_norm=one_launch(add_rms_norm_ref, mode, "w2s add_rms_norm"))
    ids = torch.randint(0, 256, (1, tokens))
    with torch.no_grad(), mode:
        # the decoder (the LM head is the engine's own), no cache (the engine's is paged)
        model.model(input_ids=ids, use_cache=False)
    return mode.ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b", choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    plain, fused = (count(args.preset, args.tokens, f, dtype) for f in (False, True))
    total_plain, total_fused = sum(plain.values()), sum(fused.values())
    print(f"{args.preset}, {args.dtype}, {args.tokens} tokens: {total_plain} kernels per forward with "
          f"transformers' ops, {total_fused} with the engine's fused kernels")
    for name in sorted(set(plain) | set(fused), key=lambda n: -plain.get(n, 0)):
        if plain.get(name, 0) != fused.get(name, 0):
            print(f"  {name:>24}: {plain.get(name, 0):5d} -> {fused.get(name, 0):5d}")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "op_count.jsonl").open("a") as f:
        f.write(json.dumps({"preset": args.preset, "tokens": args.tokens, "dtype": args.dtype,
                            "kernels_transformers": total_plain, "kernels_fused": total_fused,
                            "transformers": dict(plain), "fused": dict(fused),
                            "attention": "sdpa (the engine's paged attention is its own)",
                            "device": machine(), "torch": torch.__version__,
                            "commit": commit()}) + "\n")


if __name__ == "__main__":
    main()
