"""Kernel micro-benchmarks (pytest-benchmark, CUDA only): each kernel beside its torch path.

    DEV=$(python -c "import torch; print(torch.cuda.get_device_name().split()[-1])")  # e.g. H200
    python -m pytest bench/kernel_bench.py --benchmark-only \
        --benchmark-json bench/results/kernels-$DEV.json
    python bench/kernels_table.py bench/results/kernels-$DEV.json --markdown bench/results/kernels-$DEV.md

Every benchmark records in `extra_info`: kernel, shape, impl (and `baseline` for the torch /
existing path it is measured against), milliseconds (best of 10 after warm-up), the fraction of
peak it reaches (HBM bandwidth: bytes the operation must move / time; for extend attention the
dense bf16 tensor-core peak: causal FLOPs / time) and `temporaries_mb`: the peak memory the call
allocates beyond its inputs (outputs included). Decode benchmarks run eagerly and as a CUDA
graph replay (the engine captures decode steps; small kernels are otherwise launch-bound).
Peaks: W2S_PEAK_GBPS / W2S_PEAK_TFLOPS, else a table by device name (SXM parts).
Targets (issue 17): chunk reward >= 70% of peak for N >= 256 and never slower than the torch path;
fused LM-head <= the logits path with no [N, V] tensor; paged decode <= 1.2x SDPA on a
contiguous cache; extend >= 50% of the dense bf16 peak; sampling <= 0.3 ms with temporaries
<= 2x the logits; KV store >= 50% of peak; cascade <= 0.35x the per-beam decode.
(Named kernel_bench, not kernels: a script run from bench/ has this folder on sys.path, where
a kernels.py is what transformers finds when it probes for the `kernels` package.)
"""

import pytest
import torch
import torch.nn.functional as F

from bench.e2e import PEAK_BF16_TFLOPS, PEAK_GBPS, device_peak
from w2s_engine.kernels.cascade_attention import (
    cascade_decode_attention_triton,
    find_shared_prefixes,
    shared_prefix_words,
    static_shared_prefixes,
)
from w2s_engine.kernels.chunk_reward import (
    LMHead,
    chunk_reward,
    chunk_reward_ref,
    fused_lmhead_chunk_reward_triton,
    lmhead_chunk_width,
)
from w2s_engine.kernels.kv_cache import (
    copy_blocks_ref,
    copy_blocks_triton,
    store_kv_ref,
    store_kv_triton,
)
from w2s_engine.kernels.paged_attention import (
    paged_decode_attention_triton,
    paged_extend_attention_sdpa,
    paged_extend_attention_triton,
)
from w2s_engine.kernels.activation import silu_mul_ref, silu_mul_triton
from w2s_engine.kernels.rms_norm import (add_rms_norm_ref, add_rms_norm_triton, rms_norm_ref,
                                         rms_norm_triton)
from w2s_engine.kernels.rotary import rotary_ref, rotary_triton
from w2s_engine.kernels.sampling import sample_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need CUDA")


def _peak(env: str, table: dict, default: float) -> float:
    """e2e's device peak; a device not in the table is taken for an H100 SXM."""
    return device_peak(env, table) or default


def timed(benchmark, fn, kernel: str, shape: str, impl: str, nbytes: int = 0, flops: int = 0,
          baseline: bool = False, graph: bool = False, **info):
    """Benchmark fn with CUDA events; record ms, the fraction of peak and the temporaries.
    graph=True times a CUDA-graph replay of fn (as the engine runs a decode step: no launch
    overhead); temporaries are always those of an eager call."""
    for _ in range(3):          # warm-up, autotuning included
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    temporaries = (torch.cuda.max_memory_allocated() - base) / 2**20
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        fn = captured.replay
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run():
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    ms = min(run() for _ in range(10))
    extra = {"kernel": kernel, "shape": shape + (", CUDA graph" if graph else ""),
             "impl": impl, "baseline": baseline, "ms": round(ms, 4),
             "temporaries_mb": round(temporaries, 1), "device": torch.cuda.get_device_name()}
    if nbytes:
        gbps = nbytes / ms / 1e6
        extra.update(gbps=round(gbps, 1),
                     peak_fraction=round(gbps / _peak("W2S_PEAK_GBPS", PEAK_GBPS, 3350.0), 3),
                     peak_kind="HBM bandwidth")
    if flops:
        tflops = flops / ms / 1e9
        extra.update(tflops=round(tflops, 1), peak_kind="dense bf16",
                     peak_fraction=round(tflops / _peak("W2S_PEAK_TFLOPS", PEAK_BF16_TFLOPS,
                                                        989.4), 3))
    benchmark.extra_info.update(extra, **info)
    return ms


# ---- chunk reward ------------------------------------------------------------------------------

@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("vocab", [32000, 128256, 262144])
@pytest.mark.parametrize("n", [16, 64, 256, 1024])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_chunk_reward(benchmark, impl, n, vocab, graph):
    # In a CUDA graph too where N is small: the engine runs the reward in its scoring graphs,
    # and eagerly a 16- or 64-row reward is mostly launch overhead (0.11-0.13 ms on an H200
    # at 111ea9f, against 0.08-0.17 ms for the torch path's launches).
    if graph and n > 64:
        pytest.skip("graph rows: small N only")
    a = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, vocab, (n,), device="cuda")
    seg = torch.randint(0, 16, (n,), device="cuda")
    # Both without a bounds check, as the engine calls them (it checks on the host): the torch
    # path has none, and the wrapper's check reads the device back, a sync. With it, every
    # shape up to 64 x 262,144 took 0.19-0.21 ms on an H200 at 74255bd, whatever its size.
    if impl == "triton":
        def fn():
            return chunk_reward(a, b, t, seg, 16, bounds_checked=True)
    else:
        def fn():
            return chunk_reward_ref(a, b, t, seg, 16)
    timed(benchmark, fn, "chunk_reward", f"{n} x {vocab}", impl, nbytes=2 * a.numel() * 2,
          baseline=impl == "torch", graph=graph)


@pytest.mark.parametrize("vocab", [128256, 262144])
@pytest.mark.parametrize("n", [64, 512])
@pytest.mark.parametrize("impl", ["fused", "logits"])
def test_fused_lmhead_reward(benchmark, impl, n, vocab):
    h = torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(vocab, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(vocab, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    t = torch.randint(0, vocab, (n,), device="cuda")
    seg = torch.zeros(n, dtype=torch.long, device="cuda")
    if impl == "fused":   # the engine's: cuBLAS over vocabulary chunks, reduced as they come
        def fn():
            return fused_lmhead_chunk_reward_triton(h, LMHead(w1), h, LMHead(w2), t, seg, 1,
                                                    bounds_checked=True)
        logits_columns = lmhead_chunk_width(n, vocab, h.element_size())
    else:
        def fn():  # what an unfused engine does: cuBLAS writes both [N, V] logit tensors
            return chunk_reward(h @ w1.T, h @ w2.T, t, seg, 1, bounds_checked=True)
        logits_columns = vocab
    timed(benchmark, fn, "fused_lmhead_reward", f"N {n}, V {vocab}, H 2048", impl,
          nbytes=2 * w1.numel() * 2, baseline=impl == "logits",
          logits_mb=round(2 * n * logits_columns * 2 / 2**20, 1))


# ---- attention ---------------------------------------------------------------------------------

def decode_setup(batch, seq_len, hq=32, hkv=8, d=128, bs=16):
    blocks = batch * (seq_len // bs)
    k = torch.randn(blocks, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bt = torch.randperm(blocks, device="cuda").int().view(batch, -1)
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    return q, k, v, bt, lens


@pytest.mark.parametrize("seq_len", [1024, 4096, 8192])
@pytest.mark.parametrize("batch, graph", [(16, False), (16, True), (64, False), (64, True)])
@pytest.mark.parametrize("impl", ["paged_triton", "sdpa_contiguous"])
def test_decode_attention(benchmark, impl, batch, graph, seq_len):
    q, k, v, bt, lens = decode_setup(batch, seq_len)
    if impl == "paged_triton":
        def fn():
            return paged_decode_attention_triton(q, k, v, bt, lens, 128 ** -0.5)
    else:
        # The non-paged lower bound: each sequence's K/V contiguous, SDPA with GQA.
        kc = k.view(batch, seq_len, 8, 128).transpose(1, 2).contiguous()
        vc = v.view(batch, seq_len, 8, 128).transpose(1, 2).contiguous()
        qc = q[:, :, None]

        def fn():
            return F.scaled_dot_product_attention(qc, kc, vc, enable_gqa=True)
    timed(benchmark, fn, "decode_attention", f"{batch} seqs x {seq_len}, 32/8 heads x 128",
          impl, nbytes=2 * k.numel() * 2, baseline=impl != "paged_triton", graph=graph)


@pytest.mark.parametrize("impl", ["cascade", "cascade_graph_layout", "per_beam"])
@pytest.mark.parametrize("layout, graph", [("1x16 beams, prompt 2048 + 64", False),
                                           ("1x16 beams, prompt 2048 + 64", True),
                                           ("16x16 beams, prompt 512 + 128", True)])
def test_cascade_decode_attention(benchmark, layout, graph, impl):
    """The issue's shape: prompt 2,048 shared by 16 beams with 64 own tokens each; and the
    e2e rows' decode step of 16 concurrent CBS(4,4,8) requests (16 prompts of 512, each
    shared by its 16 beams, 128 own tokens a beam midway through 256). 8 kv heads x 128, 32
    query heads, bf16. Target: cascade <= 0.35x the per-beam kernel's time. Bytes: K and V of
    each prompt once plus each beam's own tokens (what the cascade must read)."""
    requests, prompt, own = (1, 2048, 64) if layout.startswith("1x") else (16, 512, 128)
    beams, bs = 16, 16
    pb, ob = prompt // bs, own // bs
    rows = requests * beams
    k = torch.randn(requests * pb + rows * ob, bs, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    own_blocks = requests * pb + torch.randperm(rows * ob, device="cuda").view(rows, ob)
    prompts = (torch.arange(requests, device="cuda")[:, None] * pb
               + torch.arange(pb, device="cuda")).repeat_interleave(beams, 0)
    bt = torch.cat([prompts, own_blocks], 1).int()
    lens = torch.full((rows,), prompt + own, dtype=torch.int32, device="cuda")
    q = torch.randn(rows, 32, 128, device="cuda", dtype=torch.bfloat16)
    groups = find_shared_prefixes(bt, lens, bs)       # found once per batch, as the engine will
    assert groups.num_groups == requests
    if impl == "cascade_graph_layout":
        # What the engine's decode graphs run: the groups in a bucket's fixed layout (padding
        # groups and tiles, splits sized by the bucket: a Llama-3-8B's 8,192 positions).
        words = shared_prefix_words(bt.cpu().numpy(), lens.cpu().numpy(), bs, rows, 4)
        groups = static_shared_prefixes(torch.from_numpy(words).cuda(), rows, 8192, 4)
    if impl.startswith("cascade"):
        def fn():
            return cascade_decode_attention_triton(q, k, v, bt, lens, 128 ** -0.5, groups=groups)
    else:
        def fn():
            return paged_decode_attention_triton(q, k, v, bt, lens, 128 ** -0.5)
    timed(benchmark, fn, "cascade_decode_attention", f"{layout}, 32/8 x 128", impl,
          nbytes=2 * requests * (prompt + beams * own) * 8 * 128 * 2,
          baseline=impl == "per_beam", graph=graph)


@pytest.mark.parametrize("chunk", [8, 512])
@pytest.mark.parametrize("impl", ["paged_triton", "paged_triton_per_head", "sdpa_gathered"])
def test_extend_attention(benchmark, impl, chunk):
    """16 sequences of 2,048 tokens whose last `chunk` are new (queries). FLOPs: QK^T and PV
    over the visible (causal) keys, 4 * D per (query, key, head). paged_triton is what the
    engine calls (for 8 new tokens the short-chunk kernel: a chunk's queries of a kv head's
    query heads in one tile, the keys split); paged_triton_per_head the kernel of one
    program per (sequence, query head, query tile) for every chunk."""
    batch, ctx, hq, d = 16, 2048, 32, 128
    _, k, v, bt, lens = decode_setup(batch, ctx)
    q = torch.randn(batch * chunk, hq, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(0, batch * chunk + 1, chunk, dtype=torch.int32, device="cuda")
    visible = sum(ctx - chunk + i + 1 for i in range(chunk))
    flops = 4 * d * hq * batch * visible
    if impl.startswith("paged_triton"):
        grouped = False if impl == "paged_triton_per_head" else None

        def fn():
            return paged_extend_attention_triton(q, k, v, bt, cu, lens, d ** -0.5,
                                                 max_query_len=chunk, grouped=grouped)
    else:
        # The engine's CPU path on the GPU (what a prefill route would call): gather each
        # sequence's blocks, torch SDPA with the causal mask aligned to the end of the context.
        def fn():
            return paged_extend_attention_sdpa(q, k, v, bt, cu, lens, d ** -0.5)
    # A short chunk is bound by reading each sequence's keys and values once (its peak is
    # HBM's; in a CUDA graph, as the scorers run it), a prefill-sized one by the tensor cores.
    short = chunk == 8
    timed(benchmark, fn, "extend_attention", f"16 seqs x 2048, {chunk} new, 32/8 x 128", impl,
          nbytes=2 * k.numel() * 2 if short else 0, flops=0 if short else flops,
          baseline=impl != "paged_triton", graph=short and impl != "sdpa_gathered")


# ---- cache maintenance and sampling -----------------------------------------------------------

@pytest.mark.parametrize("impl, graph", [("triton", False), ("triton", True), ("torch", False)])
def test_store_kv(benchmark, impl, graph):
    """16 MB of K and V moved: a few microseconds of HBM time, so an eager call's events also
    time the wrapper's Python; the CUDA-graph row times the kernel as a decode step runs it
    (torch's path masks the padding slots with a boolean index, which a graph cannot hold)."""
    n = 4096
    k = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k_cache = torch.zeros(2048, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(2048 * 16, device="cuda")[:n]
    fn = store_kv_triton if impl == "triton" else store_kv_ref
    timed(benchmark, lambda: fn(k, v, k_cache, v_cache, slots), "store_kv",
          "4096 tokens, 8 x 128", impl, nbytes=4 * k.numel() * 2, baseline=impl == "torch",
          graph=graph)


@pytest.mark.parametrize("rows", [16, 256])
@pytest.mark.parametrize("impl, graph", [("triton", False), ("triton", True), ("torch", False),
                                         ("torch", True)])
def test_rms_norm(benchmark, impl, graph, rows):
    """One RMSNorm of an 8B Llama's hidden size (65 of them per decode step): the kernel
    against transformers' eight ops, both eagerly and as a decode step runs them (in a CUDA
    graph, where only the kernels' own time counts)."""
    hidden = 4096
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    fn = rms_norm_triton if impl == "triton" else rms_norm_ref
    timed(benchmark, lambda: fn(x, weight, 1e-5), "rms_norm", f"{rows} x {hidden}", impl,
          nbytes=2 * x.numel() * 2, baseline=impl == "torch", graph=graph)


@pytest.mark.parametrize("tokens", [16, 256])
@pytest.mark.parametrize("impl, graph", [("triton", False), ("triton", True), ("torch", False),
                                         ("torch", True)])
def test_rotary(benchmark, impl, graph, tokens):
    """One layer's rotary embedding of an 8B Llama (32 query and 8 kv heads of 128; 32 per
    decode step): the kernel against transformers' ten ops."""
    q = torch.randn(1, tokens, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, tokens, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    cos = torch.randn(1, tokens, 128, device="cuda", dtype=torch.bfloat16)
    sin = torch.randn_like(cos)
    fn = rotary_triton if impl == "triton" else rotary_ref
    timed(benchmark, lambda: fn(q, k, cos, sin), "rotary", f"{tokens} tokens, 32/8 x 128", impl,
          nbytes=2 * (q.numel() + k.numel()) * 2, baseline=impl == "torch", graph=graph)


@pytest.mark.parametrize("tokens", [16, 256])
@pytest.mark.parametrize("impl, graph", [("triton", False), ("triton", True), ("torch", False),
                                         ("torch", True)])
def test_silu_mul(benchmark, impl, graph, tokens):
    """One MLP activation of an 8B Llama (width 14,336; 32 per decode step): the kernel
    against transformers' two ops."""
    gate = torch.randn(tokens, 14336, device="cuda", dtype=torch.bfloat16)
    up = torch.randn_like(gate)
    fn = silu_mul_triton if impl == "triton" else silu_mul_ref
    timed(benchmark, lambda: fn(gate, up), "silu_mul", f"{tokens} x 14336", impl,
          nbytes=3 * gate.numel() * 2, baseline=impl == "torch", graph=graph)


@pytest.mark.parametrize("rows", [16, 256])
@pytest.mark.parametrize("impl, graph", [("triton", False), ("triton", True), ("torch", True)])
def test_add_rms_norm(benchmark, impl, graph, rows):
    """A decoder layer's residual add and post-attention norm (32 per decode step of an 8B
    Llama): one kernel against transformers' add and eight ops."""
    hidden = 4096
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    fn = add_rms_norm_triton if impl == "triton" else add_rms_norm_ref
    timed(benchmark, lambda: fn(x, residual, weight, 1e-5), "add_rms_norm",
          f"{rows} x {hidden}", impl, nbytes=4 * x.numel() * 2, baseline=impl == "torch",
          graph=graph)


def llama_8b_layer():
    """One decoder layer of Llama-3-8B's configuration (random weights, bf16, sdpa)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=256,
                         rope_theta=500000.0, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize("tokens", [16, 256])
@pytest.mark.parametrize("impl", ["fused", "transformers"])
def test_decoder_layer(benchmark, impl, tokens):
    """One Llama-3-8B decoder layer as a decode step of `tokens` beams runs it, in a CUDA
    graph: the engine's fused kernels and merged q/k/v and gate/up GEMMs (models/fused_ops.py:
    10 kernels and 4 GEMMs besides attention) against transformers' ops (7 GEMMs). Bytes: the
    layer's weights, read once (at 16 tokens the floor is that read)."""
    # Imported here: transformers looks for a package named `kernels` (the hub's) at its own
    # import, and a script run from bench/ finds this file under that name; importing
    # transformers from it at the top would be a circular import.
    from w2s_engine.models.fused_ops import fuse_ops
    model = llama_8b_layer()
    if impl == "fused":
        assert fuse_ops(model).qkv == 1
    layer = model.model.layers[0]
    hidden = torch.randn(1, tokens, 4096, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(tokens, device="cuda")[None] + 1000
    cos_sin = model.model.rotary_emb(hidden, positions)
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    with torch.inference_mode():
        timed(benchmark, lambda: layer(hidden, position_embeddings=cos_sin,
                                       attention_mask=None, position_ids=positions),
              "decoder_layer", f"Llama-3-8B, {tokens} tokens", impl, nbytes=weights,
              baseline=impl == "transformers", graph=True)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_copy_blocks(benchmark, impl):
    pool = torch.zeros(32, 2, 4096, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    src = torch.arange(0, 256, device="cuda")
    dst = torch.arange(1000, 1256, device="cuda")
    fn = copy_blocks_triton if impl == "triton" else copy_blocks_ref
    timed(benchmark, lambda: fn(pool, src, dst), "copy_blocks", "256 blocks x 32 layers", impl,
          nbytes=2 * 256 * pool[:, :, 0].numel() * 2, baseline=impl == "torch")


@pytest.mark.parametrize("cut", ["top_k 50", "top_p 0.9", "top_k 50, top_p 0.9",
                                 "top_p 0.9, zipf"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("b", [256, 16])
def test_sampling(benchmark, impl, cut, b):
    # 16 rows (one request's beams, in a CUDA graph as the decode step runs them): the
    # vocabulary slices' case; 256 rows (16 requests) eager, as at 024353a. Gaussian logits
    # (a flat tail: a top-p nucleus of 200-400 tokens among 11k candidates), or "zipf":
    # probabilities falling as 1 / rank^1.1 in a random order, a trained model's shape (a
    # nucleus of about 33 tokens at T 0.7).
    vocab = 128256
    logits = torch.randn(b, vocab, device="cuda") * 3
    if "zipf" in cut:
        rank = torch.rand(b, vocab, device="cuda").argsort(-1).float() + 1
        logits = -1.1 * rank.log()
    t = torch.full((b,), 0.7, device="cuda")
    k = torch.full((b,), 50 if "top_k" in cut else 0, dtype=torch.int32, device="cuda")
    p = torch.full((b,), 0.9 if "top_p" in cut else 1.0, device="cuda")
    seeds = torch.arange(b, device="cuda")
    pos = torch.zeros(b, dtype=torch.long, device="cuda")
    if impl == "triton":
        def fn():
            return sample_triton(logits, t, k, p, seeds, pos)
    else:
        def fn():  # torch's usual way: topk / sort, softmax, multinomial
            x = logits / 0.7
            if "top_k" in cut:
                x = x.masked_fill(x < x.topk(50, -1).values[:, -1:], float("-inf"))
            if "top_p" in cut:
                sx, si = x.sort(-1)
                drop = sx.softmax(-1).cumsum(-1) <= 0.1
                x = x.masked_fill(drop.scatter(1, si, drop), float("-inf"))
            return torch.multinomial(torch.softmax(x, -1), 1)
    timed(benchmark, fn, "sampling", f"{b} x 128256 fp32, {cut}", impl,
          nbytes=logits.numel() * 4, baseline=impl == "torch", graph=b == 16, logits_mb=round(
              logits.numel() * 4 / 2**20, 1))
