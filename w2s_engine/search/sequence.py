"""Beam: one hypothesis of a search, with its block tables in every model's KV pool."""

from dataclasses import dataclass, field

import torch

from w2s_engine.cache.block_manager import BlockManager, BlockTable
from w2s_engine.search.bridge import DetokState


@dataclass(eq=False)   # a stream state is itself (identity), as a request is
class SmallState:
    """A beam's token stream in one small-model KV pool (scored by one or both small models).

    ids are the tokens in `table` (the small prompt, then the response), then at most one
    pending token that EFT scored but has not forwarded yet (SmallStream.forward_pending).
    Reward terms are kept per response token so a cross-tokenizer re-tokenization can roll
    back a tail. The lists (ids, terms, starts, marks) are replaced, never changed in place,
    but by add_pending: a fork shares them (a prompt's ids are hundreds of tokens, and a
    chunk's end forks every survivor K times), and add_pending copies a shared pair first.
    """

    table: BlockTable
    ids: list[int]
    response_start: int                    # ids[response_start:] are response tokens
    terms: list[float]                     # reward term of each response token
    last_hidden: dict[str, torch.Tensor]   # role -> [H] final hidden state of ids[-1]
    text: str = ""                         # cross-tokenizer only: the text `ids` tokenize
    starts: list[int] = field(default_factory=list)  # and where each token starts in it
    reads: dict[int, float] = field(default_factory=dict)  # reward models: position -> value
    marks: list[int] = field(default_factory=list)  # a PRM's step ends in the response text
    owns_lists: bool = True     # False: ids and terms may be shared with a fork

    def add_pending(self, token: int, term: float):
        """A token scored from the stored hidden state, to be forwarded at the next step (or
        forwarded already: async scheduling fed it to the step launched before it was read)."""
        assert self.table.num_tokens - len(self.ids) in (0, 1), "one pending token at a time"
        if not self.owns_lists:     # EFT: once per beam, after its fork
            self.ids, self.terms, self.owns_lists = list(self.ids), list(self.terms), True
        self.ids.append(token)
        self.terms.append(term)

    def keep_first(self, blocks: BlockManager, n: int):
        """Roll back to the first n tokens (a forward that failed part-way may have written
        the cache past them): the table, ids, terms, text, starts and reads, consistently."""
        blocks.truncate(self.table, min(n, self.table.num_tokens))
        if n >= len(self.ids):
            return
        self.ids = self.ids[:n]
        self.last_hidden = {}
        self.terms = self.terms[:max(0, n - self.response_start)]
        if n < len(self.starts):
            self.text, self.starts = self.text[:self.starts[n]], self.starts[:n]
        self.reads = {p: v for p, v in self.reads.items() if p < n}

    def fork(self, blocks: BlockManager, into: "SmallState | None" = None) -> "SmallState":
        """A child with this state's history. into: a state being dropped (a loser's), whose
        table becomes the child's (BlockManager.fork_into: cheaper than a free and a fork)."""
        if into is None:
            table = blocks.fork(self.table)
        else:
            blocks.fork_into(into.table, self.table)
            table = into.table
        # Hidden states are never written in place, so children share the tensors; the lists
        # are shared too (see the class).
        self.owns_lists = False
        return SmallState(table, self.ids, self.response_start, self.terms,
                          dict(self.last_hidden), self.text, self.starts, dict(self.reads),
                          self.marks, owns_lists=False)


@dataclass(eq=False)   # a beam is itself (identity), as a request is
class Beam:
    beam_id: int                 # unique within its request; seeds its sampling noise
    large: BlockTable | None     # None for a black-box large model
    token_ids: list[int]         # sampled response tokens (large tokenizer), EOS excluded
    small: list[SmallState] = field(default_factory=list)
    reward: float = 0.0          # sum of terms of all small streams, plus the EOS term
    eos_term: float = 0.0
    finished: bool = False
    finish_reason: str | None = None   # "stop" (EOS or stop string) or "length"
    stop_text_len: int | None = None   # response text is cut here when a stop string matched
    eos_token: int | None = None       # the EOS or stop token id that ended it
    stop_reason: str | int | None = None   # the stop string or stop token id that ended it
    min_text_len: int | None = None    # text length at min_tokens: a stop string ends past it
    stop_checked_len: int = 0          # text length already searched for stop strings
    detok: DetokState = field(default_factory=DetokState)  # incremental text of token_ids
    chunk_tokens: int = 0        # tokens sampled in the current chunk
    chunk_rewards: list[float] = field(default_factory=list)  # its lineage's, at each selection
    text: str = ""               # black-box large model only: the response as text
    num_large_tokens: int = 0    # black-box large model only: the server's token count
    parent_id: int | None = None
    # Structured outputs: its grammar matcher (large/guide.py), advanced by each token
    guide: object = None
