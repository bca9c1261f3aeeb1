"""HeadStream: a reward model's token stream on its own paged KV, read by a head at chosen tokens.

The stream of a beam is the reward model's rendering of prompt + response: the prompt part,
the response in the reward model's tokens (with a process reward model's step tags), then
a suffix appended for the read (the template's end, an end-of-turn token, say; a PRM's tag
after the unfinished step). Each update brings the stream to the beam's new rendering: the
common prefix with what is cached stays, the rest (the old suffix, a re-tokenized tail) is
rolled back, and only the new tokens are forwarded, all beams of all requests in one
forward. The head is read at the positions the update asks for (a sequence reward model:
the last token that is not its pad token; a PRM: each step's tag); a value read at a kept position stands, since a
causal model's hidden state there depends on nothing after it. A chunk of L tokens costs
L + |suffix| tokens.

Two heads: a classification head's output (`score_head`, raw; `head_probability`, a softmax
over its outputs), or the probability of a label token from the LM head
(`label_probability`, Math-Shepherd's P("+") at its tag).
"""

from collections.abc import Callable

import torch

from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.models.runner import ModelRunner
from w2s_engine.search.sequence import SmallState
from w2s_engine.search.small_stream import (Launched, StreamUpdate, batches, failing_as_batch,
                                             next_prompt_chunk, prefill_once)
from w2s_engine.search.tokens import common_prefix


def pooled_position(ids: list[int], pad_id: int | None) -> int:
    """Where a sequence classifier is read: its last token that is not its pad token, as
    transformers' *ForSequenceClassification pools (a template that ends with the pad token,
    an end-of-turn that is also the pad, is read before it; 0 where every token is one)."""
    if pad_id is None:
        return len(ids) - 1
    return next((i for i in range(len(ids) - 1, -1, -1) if ids[i] != pad_id), 0)


def score_head(runner: ModelRunner, index: int) -> Callable:
    """hidden [N, H] -> the classification head's output `index` [N] fp32."""
    head = getattr(runner.model, "score", None)
    if head is None or not 0 <= index < head.out_features:
        raise ValueError(f"the reward model has no classification head output {index} "
                         "(model.score): load a *ForSequenceClassification / "
                         "*ForTokenClassification checkpoint, or give a valid head_index")
    return lambda hidden: head(hidden)[:, index].float()


def head_probability(runner: ModelRunner, index: int) -> Callable:
    """hidden [N, H] -> P(class index) [N] fp32: a softmax over the classification head's
    outputs (a sigmoid for one output), as a step classifier's score is read (Qwen2.5-Math-PRM:
    softmax, class 1)."""
    raw = score_head(runner, index)     # raises for a missing head or output
    head = runner.model.score
    if head.out_features == 1:
        return lambda hidden: raw(hidden).sigmoid()
    return lambda hidden: head(hidden).float().softmax(-1)[:, index]


def label_probability(runner: ModelRunner, label: int, other: int | None) -> Callable:
    """hidden [N, H] -> P(label) [N] from the LM head, over {label, other} when other is given."""
    if runner.lm_head is None:
        raise ValueError("ProcessRewardModel.label reads a label token's probability from an "
                         "LM head, and this model has none (a classification head): load a "
                         "causal LM checkpoint, or leave label out to read its head")
    def read(hidden):
        logits = runner.compute_logits(hidden)
        if other is None:
            return logits.softmax(-1)[:, label]
        return logits[:, [label, other]].softmax(-1)[:, 0]
    return read


class HeadStream:

    def __init__(self, role: str, runner: ModelRunner, blocks: BlockManager, read: Callable,
                 max_batch_tokens: int):
        self.runners = {role: runner}
        self.runner = runner
        self.read = read
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.runners)

    def prefill(self, states: list[SmallState]) -> int:
        """Forward the whole prompt part of fresh states (prefill_once)."""
        return prefill_once(self, states)

    def prefill_chunk(self, states: list[SmallState], max_tokens: int):
        """Forward the next chunk of these states' prompts (in order, max_tokens in all)."""
        chunk = next_prompt_chunk(states, max_tokens)
        copies = []
        for st, _, take in chunk:
            copies += self.blocks.append(st.table, take)
        self.runner.copy_blocks(copies)
        if chunk:
            self.runner.run([(st.table, st.ids[start:start + take]) for st, start, take in chunk])

    def update(self, updates: list[StreamUpdate]) -> None:
        """Advance every state to its full_ids; state.reads holds the values at u.reads.
        Raises BatchFailed if the batch fails: retryable when it failed in the forward or the
        read, with every state rolled back to what it kept (SmallState.keep_first)."""
        self.finish(self.launch(updates))

    def launch(self, updates: list[StreamUpdate]) -> Launched:
        """update()'s first half: make room, queue the forward and the head (no device read);
        finish() or launched.roll_back() must follow."""
        with failing_as_batch():
            feeds, plans = self._make_room(updates)
        keep = [(u.state, feed_from) for u, *_, feed_from in plans]
        with failing_as_batch(self.blocks, keep):
            rows, base = [], 0
            offsets = []
            for chunk in batches(feeds, self.max_batch_tokens):
                hidden, cu = self.runner.run(chunk)
                offsets += [base + x for x in cu[:-1]]
                rows.append(hidden)
                base += hidden.shape[0]
            index = [offsets[fi] + q for _, _, fi, _, at, _, _ in plans if fi is not None
                     for q in at]
            values = (self.read(torch.cat(rows)[self.runner.upload(index).long()])
                      if index else [])
        return Launched(plans, keep, values)

    def finish(self, launched: Launched) -> None:
        """update()'s second half: read the head's values (the one wait), set the states."""
        values = launched.read(self.blocks)
        pos = 0
        for u, kept, fi, need, at, fed, _ in launched.plans:
            st = u.state
            new = dict(zip(need, values[pos:pos + len(need)]))
            pos += len(need)
            st.reads = {p: kept[p] if p in kept else new[p] for p in u.reads}
            st.ids = list(u.full_ids)
            st.response_start = u.response_start
            if u.starts is not None:
                st.text, st.starts = u.text, u.starts
            u.forwarded += fed     # +=: a request run again alone after a failed batch adds
            u.scored += len(at)    # what its second run did

    def _make_room(self, updates: list[StreamUpdate]):
        """Each state's table cut to what it keeps and grown by what it feeds. Returns the
        feeds (table, ids) and a plan per update: (update, reads kept, index of its feed or
        None, positions to read, their rows in the feed, tokens fed, first fed position)."""
        feeds, plans, copies = [], [], []
        for u in updates:
            st = u.state
            c = common_prefix(st.ids, u.full_ids)
            kept = {p: v for p, v in st.reads.items() if p < c}
            need = sorted(p for p in u.reads if p not in kept)
            if not need and c == len(st.ids) == len(u.full_ids) == st.table.num_tokens:
                plans.append((u, kept, None, [], [], 0, c))    # unchanged: its values stand
                continue
            feed_from = min([c] + need)
            self.blocks.truncate(st.table, feed_from)
            feed = u.full_ids[feed_from:]
            copies += self.blocks.append(st.table, len(feed))
            feeds.append((st.table, feed))
            plans.append((u, kept, len(feeds) - 1, need, [p - feed_from for p in need],
                          len(feed), feed_from))
        self.runner.copy_blocks(copies)
        return feeds, plans
