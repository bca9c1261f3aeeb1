"""SmallStream: the per-token terms log pi_tuned(y_t | ...) - log pi_untuned(y_t | ...), incrementally.

A small stream is one token stream in one KV pool, scored by both small models when they see
the same tokens (one tokenizer, one template: the usual case) or by one of them otherwise.
Each update brings a beam's stream to a new full tokenization (prompt + response): the common
prefix with what is cached stays, a changed tail is rolled back (its stored terms dropped),
and only new tokens are forwarded, all beams of all requests in one forward per model.
The logit for a stream's next token comes from the final hidden state of its last cached
token, kept per beam, so a chunk of n tokens costs n forwarded tokens, and an EOS term costs
none. (EFT steps a stream one token at a time instead: forward_pending.)
"""

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.kernels.chunk_reward import fused_lmhead_chunk_reward, lmhead_chunk_logprob
from w2s_engine.models.runner import BatchFailed, ModelRunner
from w2s_engine.search.sequence import SmallState
from w2s_engine.search.tokens import common_prefix_after

SIGN = {"tuned": 1.0, "untuned": -1.0}


@dataclass
class Launched:
    """A stream's update queued on the device and not read yet: launch, then finish (which
    reads it) or roll_back (when another stream's failed)."""

    plans: list
    keep: list                       # (state, tokens it keeps) to roll back to
    values: torch.Tensor | list      # the terms (or head values) on the device
    extra: tuple = ()                # what finish needs besides

    def read(self, blocks: BlockManager) -> list[float]:
        """The values on the host: the one wait of the update (an error rolls it back)."""
        with failing_as_batch(blocks, self.keep):
            return self.values.tolist() if torch.is_tensor(self.values) else self.values

    def roll_back(self, blocks: BlockManager):
        """Each state as it kept it, for an update that will not be finished."""
        for st, n in self.keep:
            st.keep_first(blocks, n)


@dataclass
class StreamUpdate:
    state: SmallState
    full_ids: list[int]       # tokenize(small prompt + response), the stream's new content
    response_start: int       # full_ids[response_start:] are scored
    finished: bool            # also score the small model's EOS after the response
    forwarded: int = 0        # out: tokens this update forwarded (per model)
    scored: int = 0           # out: reward terms computed
    eos_term: float = 0.0     # out: the EOS term when finished
    text: str = ""            # cross-tokenizer: the text full_ids tokenize, and token starts
    starts: list[int] | None = None
    reads: list[int] | None = None    # reward models: positions whose head value is wanted
    eos_id: int | None = None # the EOS target when finished (None: the tokenizer's)
    same: int = 0             # full_ids[:same] are state.ids[:same] (the bridge kept them)


class SmallStream:

    def __init__(self, runners: dict[str, ModelRunner], blocks: BlockManager, eos_id: int,
                 max_batch_tokens: int):
        assert set(runners) <= {"tuned", "untuned"} and runners
        self.runners = runners
        self.blocks = blocks
        self.eos_id = eos_id
        self.max_batch_tokens = max_batch_tokens   # new tokens in one forward, at most

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.runners)

    def prefill(self, states: list[SmallState]) -> int:
        """Forward the whole prompt of fresh states (prefill_once)."""
        return prefill_once(self, states)

    def prefill_chunk(self, states: list[SmallState], max_tokens: int):
        """Forward the next chunk of these states' prompts (in order, max_tokens in all, one
        forward per model); a state whose prompt is all in keeps its last hidden state."""
        chunk = next_prompt_chunk(states, max_tokens)
        self._append([(st.table, take) for st, _, take in chunk])
        items = [(st.table, st.ids[start:start + take]) for st, start, take in chunk]
        packed = {}     # the inputs, packed once for every model
        for role, runner in self.runners.items():
            if not items:
                break
            hidden, cu = runner.run(items, packed)
            for (st, start, take), end in zip(chunk, cu[1:]):
                if start + take == len(st.ids):
                    st.last_hidden[role] = hidden[end - 1]

    def update(self, updates: list[StreamUpdate]) -> None:
        """Advance every state to its full_ids and recompute its terms (and EOS term).
        Raises BatchFailed if the batch fails: retryable when it failed in the forward or the
        reward, with every state rolled back to what it kept (SmallState.keep_first)."""
        self.finish(self.launch(updates))

    def launch(self, updates: list[StreamUpdate]) -> "Launched":
        """update()'s first half: make room and queue the forwards and the reward kernel,
        reading nothing from the device, so that the scorer can queue every stream's work
        before it waits for any. finish() or launched.roll_back() must follow."""
        with failing_as_batch():
            feeds, plans = self._make_room(updates)
        keep = [(u.state, feed_from) for u, _, feed_from, _ in plans]
        with failing_as_batch(self.blocks, keep):
            hidden, rows, targets, segments, counts = self._forward(feeds, plans)
            terms = self._terms(rows, targets, segments, len(plans))
        return Launched(plans, keep, terms, (hidden, counts))

    def finish(self, launched: "Launched") -> None:
        """update()'s second half: read the rewards (the one wait) and set the states."""
        plans, (hidden, counts) = launched.plans, launched.extra
        terms = launched.read(self.blocks)
        last = self._last_hidden(plans, hidden)
        pos = 0
        for i, ((u, c, feed_from, fi), (forwarded, scored)) in enumerate(zip(plans, counts)):
            st = u.state
            start = max(c, u.response_start)
            n_new = len(u.full_ids) - start
            new_terms = terms[pos:pos + n_new]
            eos_term = terms[pos + n_new] if u.finished else 0.0
            pos += n_new + int(u.finished)
            kept_lo, kept_hi = u.response_start - st.response_start, c - st.response_start
            kept = st.terms[kept_lo:kept_hi] if c > u.response_start else []
            st.terms = kept + new_terms
            st.ids = u.full_ids   # the update's own list (a retry compares it, never changes it)
            st.response_start = u.response_start
            if u.starts is not None:
                st.text, st.starts = u.text, u.starts
            if fi is not None:
                for role in self.runners:
                    st.last_hidden[role] = last[role][i]
            u.eos_term = eos_term
            u.forwarded += forwarded   # +=: a request run again alone after a failed batch
            u.scored += scored         # adds what its second run did

    def _last_hidden(self, plans, hidden) -> dict[str, list]:
        """Per model, the final hidden state [H] of each plan's last fed token (rows of the
        forward's output, one gather per model; None where a plan fed nothing)."""
        fed = [(i, fi, len(u.full_ids) - feed_from - 1)
               for i, (u, _, feed_from, fi) in enumerate(plans) if fi is not None]
        out = {}
        for role, runner in self.runners.items():
            rows = [None] * len(plans)
            if fed:
                offsets = hidden[role + "_offsets"]
                index = runner.upload([offsets[fi] + k for _, fi, k in fed]).long()
                for (i, _, _), h in zip(fed, hidden[role][index].unbind(0)):
                    rows[i] = h
            out[role] = rows
        return out

    def _make_room(self, updates: list[StreamUpdate]):
        """Each state's table cut to what it keeps and grown by what it feeds. Returns the
        feeds (table, ids) and a plan per update: (update, common prefix, first fed position,
        index of its feed or None)."""
        feeds, copies, plans = [], [], []
        for u in updates:
            st = u.state
            c = common_prefix_after(st.ids, u.full_ids, u.same)
            if u.response_start < st.response_start:
                c = min(c, u.response_start)  # terms before the old response start were never kept
            if c == len(st.ids) and st.last_hidden:
                feed_from = c                 # plain extension: the stored hidden predicts ids[c]
            else:
                # Re-forward one kept token to get the hidden at c-1 (none kept: all of it).
                feed_from = max(c - 1, 0)
                self.blocks.truncate(st.table, feed_from)
                st.last_hidden = {}
            feed = u.full_ids[feed_from:]
            if feed:
                copies += self.blocks.append(st.table, len(feed))
                feeds.append((st.table, feed))
            plans.append((u, c, feed_from, len(feeds) - 1 if feed else None))
        for runner in self.runners.values():
            runner.copy_blocks(copies)
        return feeds, plans

    def _forward(self, feeds, plans):
        """One forward per model over every stream with new tokens; the rows to score (target
        position p is predicted by the hidden state at p - 1), and (forwarded, scored) per plan."""
        hidden = {}
        chunks = list(batches(feeds, self.max_batch_tokens))
        packed = [{} for _ in chunks]   # each forward's inputs, packed once for every model
        for role, runner in self.runners.items():
            parts, offsets, base = [], [], 0
            for chunk, pk in zip(chunks, packed):
                h, cu = runner.run(chunk, pk)
                parts.append(h)
                offsets += [base + x for x in cu[:-1]]
                base += h.shape[0]
            hidden[role] = torch.cat(parts) if parts else None
            hidden[role + "_offsets"] = offsets

        # Each scored target at position p is predicted by the hidden state at p - 1: a row of
        # this forward's output, or (the first one of a plain extension) the state's stored
        # last hidden. One index picks them all: stored rows go after the output. Every model
        # forwarded the same feeds, so the index is the same for each (built once, not once
        # per model and plan); only the stored rows are each model's own.
        offsets = next(hidden[role + "_offsets"] for role in self.runners)
        assert all(hidden[role + "_offsets"] == offsets for role in self.runners)
        index, stored = [], []      # stored: the states whose stored hidden is a predictor
        produced = sum(len(ids) for _, ids in feeds)   # output rows; stored ones come after
        targets, segments, counts = [], [], []
        for seg, (u, c, feed_from, fi) in enumerate(plans):
            start = max(c, u.response_start)
            end = len(u.full_ids) - 1 + int(u.finished)    # predictors are [start - 1, end)
            if end > start - 1:
                lo = start - 1
                if lo < feed_from:       # only lo == feed_from - 1 happens
                    index.append(produced + len(stored))
                    stored.append(u.state)
                    lo += 1
                if lo < end:
                    off = offsets[fi] - feed_from
                    index += range(off + lo, off + end)
            targets += u.full_ids[start:]
            if u.finished:
                targets.append(self.eos_id if u.eos_id is None else u.eos_id)
            segments += [seg] * (end - start + 1)
            counts.append((len(u.full_ids) - feed_from, end - start + 1))
        rows = {}
        if index:
            for role, runner in self.runners.items():
                parts = ([hidden[role]] if hidden[role] is not None else []) + \
                    ([torch.stack([st.last_hidden[role] for st in stored])] if stored else [])
                out = parts[0] if len(parts) == 1 else torch.cat(parts)
                rows[role] = out[runner.upload(index).long()]
        return hidden, rows, targets, segments, counts

    def forward_pending(self, states: list[SmallState]) -> list[int]:
        """Forward each state's pending ids (past its table: EFT scores a sampled token from the
        stored hidden state before it forwards it) and keep the new last hidden states.
        Returns the tokens forwarded per state, per model."""
        pending = [st.ids[st.table.num_tokens:] for st in states]
        fed = [(st, ids) for st, ids in zip(states, pending) if ids]
        if fed:
            self._append([(st.table, len(ids)) for st, ids in fed])
            for role, runner in self.runners.items():
                hidden, cu = runner.run([(st.table, ids) for st, ids in fed])
                for (st, _), end in zip(fed, cu[1:]):
                    st.last_hidden[role] = hidden[end - 1]
        return [len(ids) for ids in pending]

    def next_logits(self, states: list[SmallState],
                    tokens_from: tuple[torch.Tensor, np.ndarray] | None = None) \
            -> tuple[dict[str, torch.Tensor], list[int]]:
        """Each state's next-token logits [B, V] per model, its pending tokens forwarded first;
        and the tokens forwarded per state. When every state has one pending token (EFT after
        its first step) and the runners decode on static buffers, that is a decode: a CUDA
        graph replay per model, the LM head in it (each model's logits are valid until its
        next decode). Else forward_pending and the LM head on the stored hidden states.
        tokens_from: (tokens [P] on the device, rows [m]): the first m states' pending token
        is tokens[rows], sampled by a step still in flight and not in their ids yet (async
        scheduling); then every state feeds one token, as a decode (on the graphs when they
        fit, else eagerly)."""
        carried = 0 if tokens_from is None else len(tokens_from[1])
        pending = [len(st.ids) - st.table.num_tokens + (i < carried)
                   for i, st in enumerate(states)]
        graphs = [r.graphs for r in self.runners.values()]
        if carried or (states and all(n == 1 for n in pending) and
                       all(g is not None and len(states) <= g.max_batch for g in graphs)):
            assert all(n == 1 for n in pending), "a decode feeds one token per state"
            self._append([(st.table, 1) for st in states])
            seqs = [(st.table, st.ids[-1] if i >= carried else 0)
                    for i, st in enumerate(states)]
            logits = {role: runner.decode_logits(seqs, None, tokens_from)[0]
                      for role, runner in self.runners.items()}
            for st in states:
                st.last_hidden = {}     # not kept on this path; a later extend re-forwards one
            return logits, pending
        fed = self.forward_pending(states)
        return {role: runner.compute_logits(torch.stack([st.last_hidden[role] for st in states]))
                for role, runner in self.runners.items()}, fed

    def _terms(self, rows, targets, segments, num_segments) -> torch.Tensor | list:
        """Each scored token's term, on the device (not read yet)."""
        if not targets:
            return []
        ints = self.upload(targets + segments).long()    # one asynchronous copy
        tgt, seg = ints[:len(targets)], ints[len(targets):]
        # Checked here, on the host, so the kernels need not read them back to check.
        vocab = min(r.lm_head.weight.shape[0] for r in self.runners.values())
        if not (0 <= min(targets) and max(targets) < vocab):
            raise ValueError(f"a scored token id is outside the small models' vocabulary "
                             f"[0, {vocab}): [{min(targets)}, {max(targets)}]")
        assert 0 <= min(segments) and max(segments) < num_segments
        heads = {role: r.lm_head for role, r in self.runners.items()}
        if len(heads) == 2 and heads["tuned"].weight.shape[0] == heads["untuned"].weight.shape[0]:
            diff, _ = fused_lmhead_chunk_reward(rows["tuned"], heads["tuned"], rows["untuned"],
                                                heads["untuned"], tgt, seg, num_segments,
                                                bounds_checked=True)
            return diff
        # One model, or two whose heads differ in size (one resized for an added token): each
        # model's log-probs over its own vocabulary, as its own forward normalises them.
        return sum(SIGN[role] * lmhead_chunk_logprob(rows[role], head, tgt, seg, num_segments,
                                                     bounds_checked=True)[0]
                   for role, head in heads.items())

    def upload(self, words) -> torch.Tensor:
        """int32 words to the stream's device in one asynchronous copy (ModelRunner.upload)."""
        return next(iter(self.runners.values())).upload(words)

    def _append(self, items):
        copies = []
        for table, n in items:
            copies += self.blocks.append(table, n)
        for runner in self.runners.values():
            runner.copy_blocks(copies)


@contextmanager
def failing_as_batch(blocks: BlockManager | None = None, keep: list | None = None):
    """An error in the block raises BatchFailed. With keep ([(state, tokens)]), each state is
    rolled back to its first tokens first, so the batch is retryable; without, the block left
    its states part-way (through copy-on-write): the pool's trouble, not one request's."""
    try:
        yield
    except Exception as e:
        for st, n in keep or []:
            st.keep_first(blocks, n)
        raise BatchFailed(retryable=keep is not None) from e


def prefill_once(stream, states: list[SmallState]) -> int:
    """Forward the whole prompt of fresh states (ids set, table empty) through a stream
    (SmallStream, HeadStream), each starting from what the prefix cache holds of it; returns
    the prompt tokens read from the cache. A prompt met twice here (score() of many
    responses to one prompt) is forwarded once: the first of each goes first, and the others
    then read its blocks, all but its last token (whose hidden state each needs)."""
    seen, first, again = set(), [], []
    for st in states:
        key = tuple(st.ids)
        (again if key in seen else first).append(st)
        seen.add(key)
    cached = 0
    for part in (first, again):
        for st in part:
            cached += stream.blocks.take_cached_prefix(st.table, st.ids)
        while not all(prompt_in(st) for st in part):
            stream.prefill_chunk(part, stream.max_batch_tokens)
        for st in part:
            stream.blocks.cache_prompt(st.table, st.ids)
    return cached


def prompt_in(st: SmallState) -> bool:
    """Whether a state's prompt is all forwarded (its table holds every id)."""
    return st.table.num_tokens == len(st.ids)


def next_prompt_chunk(states: list[SmallState], max_tokens: int) -> list[tuple]:
    """The next max_tokens prompt tokens of these states, first come first: (state, start,
    count) each, from where each state's table ends."""
    assert all(st.ids for st in states), "a small prompt needs at least one token"
    chunk = []
    for st in states:
        if max_tokens <= 0:
            break
        start = st.table.num_tokens
        take = min(len(st.ids) - start, max_tokens)
        if take > 0:
            chunk.append((st, start, take))
            max_tokens -= take
    return chunk


def batches(items, max_tokens: int):
    """Split a list of (table, ids) into forwards of at most max_tokens new tokens."""
    batch, n = [], 0
    for item in items:
        if batch and n + len(item[1]) > max_tokens:
            yield batch
            batch, n = [], 0
        batch.append(item)
        n += len(item[1])
    if batch:
        yield batch
