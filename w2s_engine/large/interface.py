"""LargeModel: what the engine asks of the large model, local (large/local.py) or behind an
OpenAI-compatible server (large/remote.py)."""

from typing import Protocol

from w2s_engine.cache.block_manager import BlockManager, BlockTable
from w2s_engine.params import SearchParams
from w2s_engine.search.eft import EFT
from w2s_engine.search.request import SearchRequest
from w2s_engine.search.sequence import Beam


class LargeModel(Protocol):
    tokenizer: object | None        # None: the server tokenizes
    eos_ids: set[int]
    blocks: BlockManager | None     # None: no KV pool here
    eft: EFT | None                 # steers sampling token by token where the models allow
    decode_steps: int               # decode steps launched here so far
    runs_ahead: bool                # a decode step is in flight, its tokens not read yet

    def check_params(self, params: SearchParams):
        """Refuse (InvalidParam) or fit what this backend cannot run as asked."""

    def encode_prompt(self, text: str, special: bool, max_new_tokens: int) -> list[int]:
        """The templated prompt's ids (raises ValueError past the model's context)."""

    def new_table(self) -> BlockTable | None:
        """A root beam's table in the large pool."""

    def prefill(self, requests: list[SearchRequest], max_tokens: int) -> list[SearchRequest]:
        """Advance the prompts of admitted requests (their roots exist) by up to max_tokens in
        all; returns those ready for their first tokens (now or before)."""

    def advance(self, requests: list[SearchRequest]) -> list[tuple[SearchRequest, str]]:
        """Sample the next tokens of every generating beam; the requests that failed, and why.
        Raises BatchFailed when the batch as a whole failed."""

    def drop(self, request: SearchRequest):
        """Stop what runs for a request that ended (a black box's calls in flight)."""

    def response_text(self, beam: Beam) -> str:
        """The beam's response as text, cut before a matched stop string."""

    def num_tokens(self, beam: Beam) -> int:
        """The beam's response length in large-model tokens."""
