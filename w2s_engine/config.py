"""EngineConfig: memory, precision and batching settings of one Engine."""

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    device: str | None = None           # None: cuda when available, else cpu
    dtype: torch.dtype | None = None    # None: bfloat16 on cuda, float32 on cpu
    block_size: int = 16                # CBS forks every few tokens: small pages waste little
    num_kv_blocks: int | None = None    # blocks per KV pool; None: from the memory budget
    kv_cache_memory_fraction: float | None = None  # of free GPU memory after loading; None: 0.85
    kv_cache_memory_bytes: int | None = None # explicit budget for all pools together
    cpu_kv_cache_bytes: int = 2 << 30   # default budget on cpu
    # Cap on the prompt tokens a step forwards per model (long prompts go in chunks of it), and
    # on the new tokens a scoring forward batches (one beam's own update goes whole).
    max_batch_tokens: int = 8192
    max_waiting: int | None = None      # queue bound (the server answers 429 past it)
    small_special_tokens: bool = False  # add BOS etc. to the small models' prompts
    progress: bool = True               # tqdm bar for a list of prompts
    # The large model's decode on static buffers, a CUDA graph per batch bucket up to
    # cuda_graph_max_batch beams. None: on with CUDA. On CPU, True runs the same padded
    # static path eagerly (there are no graphs to capture).
    cuda_graphs: bool | None = None
    cuda_graph_max_batch: int = 512
    # RMSNorms of Llama's or Gemma's form, Llama-form rotary embeddings, SiLU-gated MLPs'
    # activations and decoder layers' residual add + norm (Llama, Qwen, Mistral, Gemma, ...)
    # as one Triton kernel each instead of transformers' chains of torch ops, and q/k/v and
    # gate/up projections as one GEMM each (models/fused_ops.py). None: on with CUDA. Off
    # under torch_compile, which fuses the small ops itself. On CPU, True runs the same
    # reference ops through the swapped modules.
    fused_ops: bool | None = None
    # Shared-prefix (cascade) decode attention on that static path: the beams of a request
    # read their common blocks (the prompt, a shared history) once per group. None: on with
    # CUDA graphs on CUDA. On an H200 at 111ea9f it made one CBS(4,4,8) request at prompt
    # 2,048 15% faster and 16 concurrent requests at prompt 512 1% faster (16% at 024353a),
    # and every cascade test of the gpu run passed. On CPU, True runs the reference.
    cascade_attention: bool | None = None
    # torch.compile of every model's forward (the paged attention stays one opaque op), under
    # the graphs where they run: fuses the norms, rotary embedding and activations. Off by
    # default until it is measured on a GPU (bench/e2e.py --compile); compiling takes a while
    # at start and again for new shapes. A string names the torch.compile backend.
    torch_compile: bool | str = False
    # The host prepares decode step n+1 (slots, rows, sampling parameters) and launches it
    # before it reads step n's tokens, which step n+1 takes from the device; it then records
    # them while the device computes. A request whose chunk ends at step n forks its next
    # chunk once step n is read, into step n+2. A beam that stops on EOS or a stop string
    # computes one token more, which is dropped. Results are the same either way. None: on
    # with CUDA (vLLM's name and default); on a CPU there is nothing to overlap. On an H200
    # at 111ea9f it made CBS(4,4,8) 1.11x faster at one request, 1.10x at 16 and 1.21x with
    # 16 requests arriving every 2 steps, and every async test of the gpu run passed.
    async_scheduling: bool | None = None
    # With async_scheduling: the scoring of requests whose chunks end while a decode step of
    # other requests is in flight is queued behind it and read the next step, after that
    # step's decode is launched, so the device does not wait while the host reads rewards,
    # selects and forks (out-of-step requests, as a server's arrivals make them, end chunks
    # at most steps). Those requests start their next chunk a step later. False: read at
    # once, as without async scheduling. Results are the same either way.
    scoring_ahead: bool = True
    # Chunk ends with no decode step in flight (requests in step, as a batch of prompts makes
    # them, or waiting scheduling) are scored in up to this many parts by request, each of
    # 512 scoring tokens or more, each launched before the one before it is read: the device
    # computes a part while the host plans the next one, or reads, selects and forks the last
    # one. 1: one batch. Results are the same either way. Not yet measured on a GPU.
    scoring_parts: int = 2
    # A prompt's full KV blocks, in every model, stay cached by their tokens after its request
    # ends (until the memory is needed), and a later prompt that starts with the same tokens
    # (a system prompt, few-shot examples, the same prompt searched again) reads them instead
    # of forwarding those tokens (vLLM's automatic prefix caching, on by default there too).
    # The cached tokens' keys and values were computed in another batch: results equal those
    # without it up to the model's floating-point rounding, as a seeded request's do in any
    # batch.
    prefix_caching: bool = True
    # True: what the engine loaded is frozen out of Python's full collections (gc.freeze),
    # which otherwise walk its ~400k objects every few seconds of searching and stall every
    # search (0.2 s each on a 2-core CPU, once in some 256 steps of 16 requests). Off by
    # default: it is the process's collector (what is alive at the freeze and dies later in
    # a reference cycle is never reclaimed); `w2s serve` freezes its own (frozen_heap.py).
    freeze_gc: bool = False
    # "fp8": the large model's linear layers (not its LM head) hold float8 weights with a
    # scale per output row, and each token's input is quantized as it comes (vLLM's
    # `--quantization fp8`, models/fp8_linear.py): half the weight bytes a decode step reads,
    # and their room goes to the KV pools. A checkpoint the engine loads is quantized weight
    # by weight as it loads (never whole in `dtype`: a model whose FP8 weights fit loads); a
    # model passed in memory is quantized in place. On CUDA it needs an FP8 GPU
    # (compute capability 8.9: Ada, Hopper) and bfloat16. The small models keep their dtype:
    # the rewards are theirs. None: the weights as they load. Not yet measured on a GPU.
    quantization: str | None = None

    def resolve(self) -> "EngineConfig":
        """Fill in the defaults and check every setting, before any model loads (ValueError
        or TypeError naming the setting and what to give)."""
        self._check_types()
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"EngineConfig.device={self.device!r}: give 'cpu', 'cuda' or "
                             "'cuda:N'") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"EngineConfig.device={self.device!r}: the engine runs on 'cpu' "
                             "or 'cuda'")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"EngineConfig.device={self.device!r}: this torch "
                             f"({torch.__version__}) sees no CUDA device: use 'cpu'")
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPE_NAMES:
                raise ValueError(f"EngineConfig.dtype={self.dtype!r}: give one of "
                                 f"{sorted(DTYPE_NAMES)} or a torch dtype")
            self.dtype = DTYPE_NAMES[self.dtype]
        if self.dtype is None:
            self.dtype = torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"EngineConfig.dtype={self.dtype}: give torch.float32, "
                             "torch.float16 or torch.bfloat16")
        if self.cuda_graphs is None:
            self.cuda_graphs = str(self.device).startswith("cuda")
        if self.num_kv_blocks is not None and self.kv_cache_memory_bytes is not None:
            raise ValueError(f"EngineConfig.num_kv_blocks={self.num_kv_blocks} and "
                             f"kv_cache_memory_bytes={self.kv_cache_memory_bytes} both size the "
                             "KV pools: give one of them")
        if self.kv_cache_memory_fraction is None:
            self.kv_cache_memory_fraction = 0.85
        elif device.type == "cpu":
            # Said, not silently dropped: a setting that does nothing looks like it worked.
            log.warning("EngineConfig.kv_cache_memory_fraction=%s is a share of a GPU's free "
                        "memory and does nothing on a CPU: the KV pools there take "
                        "cpu_kv_cache_bytes (%d), or kv_cache_memory_bytes or num_kv_blocks",
                        self.kv_cache_memory_fraction, self.cpu_kv_cache_bytes)
        if self.torch_compile == "":
            raise ValueError("EngineConfig.torch_compile='': give True, False or a backend name "
                             "such as 'inductor'")
        if isinstance(self.torch_compile, str):   # named now, not by torch.compile mid-load
            from torch._dynamo import list_backends
            known = list_backends(exclude_tags=())
            if self.torch_compile not in known:
                raise ValueError(f"EngineConfig.torch_compile={self.torch_compile!r} is not a "
                                 f"torch.compile backend here: give True (inductor) or one of "
                                 f"{', '.join(list_backends())}")
        if self.fused_ops is None:   # (torch.compile fuses the small ops itself)
            self.fused_ops = str(self.device).startswith("cuda") and not self.torch_compile
        if self.fused_ops and self.torch_compile:
            # The runner would drop one of them silently: the compiled forward traces the
            # model's own ops, not the swapped modules.
            raise ValueError("fused_ops=True and torch_compile both fuse the small ops, and "
                             "only one runs: set fused_ops=False (or None) with torch_compile, "
                             "or leave torch_compile off")
        if self.async_scheduling is None:
            self.async_scheduling = str(self.device).startswith("cuda")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"EngineConfig.quantization={self.quantization!r}: give 'fp8' or "
                             "None (the weights as they load)")
        if self.quantization == "fp8" and device.type == "cuda":
            if self.dtype != torch.bfloat16:
                raise ValueError(f"EngineConfig.quantization='fp8' on CUDA runs a bfloat16 "
                                 f"model (the scaled FP8 GEMM writes bfloat16), not {self.dtype}: "
                                 "set dtype=torch.bfloat16")
            capability = torch.cuda.get_device_capability(device)
            if capability < (8, 9):
                raise ValueError(f"EngineConfig.quantization='fp8': this GPU (compute capability "
                                 f"{capability[0]}.{capability[1]}) has no FP8 tensor cores; "
                                 "they start at 8.9 (Ada, Hopper): leave quantization None")
        if self.cascade_attention is None:
            self.cascade_attention = str(self.device).startswith("cuda") and self.cuda_graphs
        if self.cascade_attention and not self.cuda_graphs:
            raise ValueError("cascade_attention runs on the static decode path: set "
                             "cuda_graphs=True (on a CPU too, where it runs eagerly)")
        for name, ok, want in (
                ("cuda_graph_max_batch", self.cuda_graph_max_batch >= 1, "a value of at least 1"),
                ("max_batch_tokens", self.max_batch_tokens >= 1, "a value of at least 1"),
                ("scoring_parts", self.scoring_parts >= 1, "a value of at least 1 (1: one batch)"),
                ("kv_cache_memory_fraction", 0 < self.kv_cache_memory_fraction <= 1,
                 "a value in (0, 1]"),
                ("block_size", self.block_size > 0 and self.block_size & (self.block_size - 1)
                 == 0, "a power of two"),
                ("num_kv_blocks", self.num_kv_blocks is None or self.num_kv_blocks >= 1,
                 "None (sized from memory) or at least 1"),
                ("kv_cache_memory_bytes", self.kv_cache_memory_bytes is None
                 or self.kv_cache_memory_bytes >= 1, "None or a positive number of bytes"),
                ("cpu_kv_cache_bytes", self.cpu_kv_cache_bytes >= 1, "a positive number of bytes"),
                ("max_waiting", self.max_waiting is None or self.max_waiting >= 0,
                 "None (no bound) or at least 0")):
            if not ok:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r}: give {want}")
        return self

    def _check_types(self):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        for name, ok, want in (
                ("block_size", is_int(self.block_size), "an int"),
                ("num_kv_blocks", self.num_kv_blocks is None or is_int(self.num_kv_blocks),
                 "an int or None"),
                ("kv_cache_memory_fraction", self.kv_cache_memory_fraction is None
                 or isinstance(self.kv_cache_memory_fraction, (int, float))
                 and not isinstance(self.kv_cache_memory_fraction, bool), "a number or None"),
                ("kv_cache_memory_bytes", self.kv_cache_memory_bytes is None
                 or is_int(self.kv_cache_memory_bytes), "an int or None"),
                ("cpu_kv_cache_bytes", is_int(self.cpu_kv_cache_bytes), "an int"),
                ("max_batch_tokens", is_int(self.max_batch_tokens), "an int"),
                ("max_waiting", self.max_waiting is None or is_int(self.max_waiting),
                 "an int or None"),
                ("cuda_graph_max_batch", is_int(self.cuda_graph_max_batch), "an int"),
                ("scoring_parts", is_int(self.scoring_parts), "an int"),
                ("quantization", self.quantization is None or isinstance(self.quantization, str),
                 "'fp8' or None"),
                ("device", self.device is None or isinstance(self.device, (str, torch.device)),
                 "a str such as 'cuda' or 'cpu', or None"),
                ("dtype", self.dtype is None or isinstance(self.dtype, (str, torch.dtype)),
                 "a torch dtype, its name, or None"),
                ("cuda_graphs", self.cuda_graphs is None or isinstance(self.cuda_graphs, bool),
                 "True, False or None"),
                ("fused_ops", self.fused_ops is None or isinstance(self.fused_ops, bool),
                 "True, False or None"),
                ("torch_compile", isinstance(self.torch_compile, (bool, str)),
                 "True, False or a backend name"),
                *((name, getattr(self, name) is None or isinstance(getattr(self, name), bool),
                   "True, False or None") for name in ("cascade_attention", "async_scheduling")),
                *((name, isinstance(getattr(self, name), bool), "True or False")
                  for name in ("small_special_tokens", "progress", "scoring_ahead",
                               "freeze_gc", "prefix_caching"))):
            if not ok:
                raise TypeError(f"EngineConfig.{name}={getattr(self, name)!r}: give {want}")


QUANTIZATIONS = (None, "fp8")

# dtype names as vLLM and transformers spell them
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
