"""KV store through a slot mapping, and the batched block copy behind copy-on-write.

Pool layout (one per model): kv_pool [num_layers, 2, num_blocks, block_size, Hkv, D];
k_cache = kv_pool[l, 0] and v_cache = kv_pool[l, 1] are contiguous [num_blocks, block_size,
Hkv, D] views. Token position p of a sequence lives in slot table[p // bs] * bs + p % bs.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths below need no Triton
    triton = None


# ---- store ----------------------------------------------------------------------------------

def store_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


if triton is not None:
    @triton.jit
    def _store_kv_kernel(
        k_ptr, v_ptr,                 # [N, Hkv, D] (any token / head stride, unit dim stride)
        k_cache_ptr, v_cache_ptr,     # [num_slots, Hkv, D] contiguous
        slot_ptr,                     # [N]
        stride_kn, stride_kh, stride_vn, stride_vh,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # grid: (N,). One program moves a token's K and V for all kv heads: a contiguous
        # Hkv * D run in the cache, large enough per program to keep the copy bandwidth-bound.
        token = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot < 0:  # padding
            return
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NUM_HEADS) & (d < HEAD_DIM)
        k = tl.load(k_ptr + token * stride_kn + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + token * stride_vn + h * stride_vh + d, mask=mask)
        dst = slot * (NUM_HEADS * HEAD_DIM) + h * HEAD_DIM + d
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_store(k, v, k_cache, v_cache, slot_mapping):
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [N, Hkv, D]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k_cache / v_cache must be [num_blocks, block_size, {k.shape[1]}, "
                         f"{k.shape[2]}]; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (views kv_pool[l, 0] / [l, 1])")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int32/int64 [{k.shape[0]}]; got "
                        f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if not (k.is_floating_point() and v.is_floating_point()):
        raise TypeError("k and v must be floating point")


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    n, heads, dim = k.shape
    if n == 0:
        return
    block = triton.next_power_of_2(heads) * triton.next_power_of_2(dim)
    _store_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_HEADS=heads, HEAD_DIM=dim, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(dim), num_warps=max(1, min(8, block // 256)))


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    if k.is_cuda and triton is not None:
        return store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    return store_kv_ref(k, v, k_cache, v_cache, slot_mapping)


# ---- copy-on-write ----------------------------------------------------------------------------

def copy_blocks_ref(kv_pool, src, dst):
    kv_pool[:, :, dst.long()] = kv_pool[:, :, src.long()]


if triton is not None:
    @triton.jit
    def _copy_blocks_kernel(
        pool_ptr,                 # [L * 2, num_blocks, block_numel] contiguous
        src_ptr, dst_ptr,         # [P]
        num_blocks, block_numel,
        BLOCK: tl.constexpr,
    ):
        # one program per (pair, layer x K/V, tile of the block): all layers in one launch
        pair = tl.program_id(0)
        plane = tl.program_id(1).to(tl.int64)
        tile = tl.program_id(2)
        src = tl.load(src_ptr + pair).to(tl.int64)
        dst = tl.load(dst_ptr + pair).to(tl.int64)
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        mask = offs < block_numel
        base = plane * num_blocks * block_numel
        x = tl.load(pool_ptr + base + src * block_numel + offs, mask=mask)
        tl.store(pool_ptr + base + dst * block_numel + offs, x, mask=mask)


def _check_copy(kv_pool, src, dst):
    if kv_pool.dim() != 6 or kv_pool.shape[1] != 2:
        raise ValueError(f"kv_pool must be [layers, 2, blocks, block_size, Hkv, D]; got "
                         f"{tuple(kv_pool.shape)}")
    if not kv_pool.is_contiguous():
        raise ValueError("kv_pool must be contiguous")
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError(f"src and dst must be [P]; got {tuple(src.shape)} and {tuple(dst.shape)}")
    if src.dtype not in (torch.int32, torch.int64) or dst.dtype not in (torch.int32, torch.int64):
        raise TypeError("src and dst must be integer block indices")


def copy_blocks_triton(kv_pool, src, dst):
    _check_copy(kv_pool, src, dst)
    if src.numel() == 0:
        return
    layers, _, num_blocks = kv_pool.shape[:3]
    block_numel = kv_pool[0, 0, 0].numel()
    BLOCK = min(4096, triton.next_power_of_2(block_numel))
    grid = (src.numel(), layers * 2, triton.cdiv(block_numel, BLOCK))
    _copy_blocks_kernel[grid](kv_pool, src, dst, num_blocks, block_numel, BLOCK=BLOCK)


def ordered_runs(pairs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Copy-on-write pairs in the order they were queued, cut into runs in which no block is
    both read and written (one launch each: a launch's programs run unordered). A block a pass
    copied from can be freed and handed out again in the same pass (a prefix hit's block is
    valid again where it stood in the free list, maybe first): its copy to a new owner comes
    after its copy away, so copying the runs in turn reads it before it is overwritten."""
    runs, read, written = [[]], set(), set()
    for src, dst in pairs:
        if dst in read or src in written:
            runs.append([])
            read, written = set(), set()
        runs[-1].append((src, dst))
        read.add(src)
        written.add(dst)
    return runs if pairs else []


def copy_blocks(kv_pool, src, dst):
    if kv_pool.is_cuda and triton is not None:
        return copy_blocks_triton(kv_pool, src, dst)
    return copy_blocks_ref(kv_pool, src, dst)
