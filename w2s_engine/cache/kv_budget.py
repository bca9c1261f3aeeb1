"""KVBudget: how many blocks each pool has, and how many of them each request may hold.

Admission reserves a request's worst case in every pool it uses, so a running search never
runs out of blocks: a request waits until its reservation fits beside the others'. The worst
case of a search is a tree, not W*K copies: only the current candidates hold tables and they
share their history (see tree_blocks). Everything here is arithmetic on plain numbers, with
the block manager's own rounding (blocks_for); no model, tensor or block table is touched.

Pools are named by key: "large" for the large model's, 0, 1, ... for the small streams'.
"""

import os
from dataclasses import dataclass, field

import torch

from w2s_engine.cache.block_manager import blocks_for

# Small-model tokens per large-model token that admission reserves KV for when the vocabularies
# differ. Real text runs near 1 (Gemma -> SmolLM2: 1.1); past 4, the reservation grows at run time.
SMALL_TOKENS_PER_LARGE = 4


def pool_blocks(bytes_per_block: int, num_kv_blocks: int | None = None,
                budget_bytes: int | None = None, device: str = "cpu",
                memory_fraction: float = 0.85, cpu_budget_bytes: int = 2 << 30,
                other_bytes: int = 0) -> int:
    """Blocks per pool: all pools have the same count, and one block of every pool together
    takes bytes_per_block. An explicit num_kv_blocks wins, then an explicit budget, then a
    fraction of the free device memory (CUDA) less other_bytes (what the graphs will hold),
    or the CPU budget. Pools and graphs past the device's memory are refused, naming the
    setting they came from (the allocator's error names none)."""
    memory = device_memory_bytes(device)
    if num_kv_blocks is not None:
        num_blocks, setting = num_kv_blocks, "num_kv_blocks"
    else:
        setting = "kv_cache_memory_bytes"
        if budget_bytes is None:
            if str(device).startswith("cuda"):
                budget_bytes = int(memory * memory_fraction) - other_bytes
                setting = "kv_cache_memory_fraction (of the free GPU memory, less the graphs')"
            else:
                budget_bytes = cpu_budget_bytes
                setting = "cpu_kv_cache_bytes"
        # Each pool has one more block than it hands out: the scratch block padding rows
        # write to.
        num_blocks = budget_bytes // bytes_per_block - 1
        if num_blocks < 4:
            raise ValueError(f"a KV budget of {budget_bytes} bytes ({setting}) holds "
                             f"{num_blocks} blocks of {bytes_per_block} bytes (and a scratch "
                             f"block): raise {setting}, or set num_kv_blocks")
    pools = (num_blocks + 1) * bytes_per_block
    if memory is not None and pools + other_bytes > memory:
        graphs = (f" and the CUDA graphs' static buffers {other_bytes} (cuda_graph_max_batch)"
                  if other_bytes else "")
        raise ValueError(f"the KV pools take {pools} bytes ({num_blocks} blocks, from "
                         f"{setting}: {bytes_per_block} bytes a block for all the models, with "
                         f"block_size){graphs}, more than the {memory} bytes of memory {device} "
                         f"has: lower {setting}, block_size or cuda_graph_max_batch")
    return num_blocks


def device_memory_bytes(device: str) -> int | None:
    """The memory the pools and graphs can take on `device`: the free GPU memory on CUDA, the
    physical memory on a CPU; None where the system does not say."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def tree_blocks(block_size: int, w: int, k: int, prompt_len: int, response_len: int,
                chunk_len: int) -> int:
    """Blocks a search tree can hold at once. Only the current candidates hold tables, and
    they share their history: the prompt's full blocks once; at most W survivor lineages of up
    to response_len tokens (+1: its copy of the partial block it forked from); and each of the
    W*K candidates' own chunk (+1 likewise). Never more than W*K full copies."""
    bs = block_size
    copies = blocks_for(prompt_len, bs) + 1 + w * k * (blocks_for(response_len, bs) + 1)
    tree = (prompt_len // bs + w * (blocks_for(response_len, bs) + 1)
            + w * k * (blocks_for(chunk_len, bs) + 1))
    return min(copies, tree)


@dataclass
class KVBudget:
    num_blocks: int                    # per pool
    block_size: int
    reserved: dict = field(default_factory=dict)   # pool key -> blocks reserved by requests

    def __post_init__(self):
        assert self.num_blocks > 0 and self.block_size > 0

    def add_pool(self, key):
        self.reserved[key] = 0

    def reservation(self, w: int, k: int, max_new_tokens: int, chunk_len: int,
                    large_prompt_len: int | None, small: list[tuple[int, bool, int]]) -> dict:
        """Worst-case blocks per pool for one request: its search tree in every pool it uses
        (large_prompt_len None: no large pool, the large model is a black box). small: per
        scorer stream, (prompt tokens, whether it reads the large model's ids as they are,
        tokens of a reward model's suffix after the response)."""
        need = {}
        if large_prompt_len is not None:
            need["large"] = tree_blocks(self.block_size, w, k, large_prompt_len,
                                        max_new_tokens, chunk_len)
        for i, (n, shared, suffix) in enumerate(small):
            if shared:
                need[i] = tree_blocks(self.block_size, w, k, n, max_new_tokens + suffix,
                                      chunk_len + suffix)
            else:
                # A re-tokenized response can be longer than the large model's tokens: reserve
                # SMALL_TOKENS_PER_LARGE of them (+8 for a rolled-back tail), and grow at run
                # time past that (grow).
                need[i] = tree_blocks(self.block_size, w, k, n,
                                      SMALL_TOKENS_PER_LARGE * max_new_tokens + 8 + suffix,
                                      SMALL_TOKENS_PER_LARGE * chunk_len + 8 + suffix)
        return need

    def fits(self, need: dict) -> bool:
        return all(self.reserved[key] + n <= self.num_blocks for key, n in need.items())

    def reserve(self, need: dict):
        assert self.fits(need), "reserve only what fits"
        for key, n in need.items():
            self.reserved[key] += n

    def release(self, need: dict):
        for key, n in need.items():
            self.reserved[key] -= n
            assert self.reserved[key] >= 0, f"pool {key!r} released more than it reserved"

    def grow(self, held_by_request: dict, key, blocks: int) -> int:
        """Grow a request's reservation in pool `key` (its dict, updated in place) to `blocks`
        if the pool has the unreserved room. Returns the blocks still missing: 0 on success."""
        extra = blocks - held_by_request[key]
        if extra <= 0:
            return 0
        if self.reserved[key] + extra > self.num_blocks:
            return extra
        held_by_request[key] += extra
        self.reserved[key] += extra
        return 0
