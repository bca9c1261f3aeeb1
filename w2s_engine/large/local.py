"""LocalLarge: the large model in this process, on its own paged KV pool.

prefill() forwards every new prompt once, in chunks of at most max_batch_tokens per step for
all prompts together, and keeps each prompt's last logits: the W*K first children of a prompt
all sample their first token from them, with no forward.
advance() samples one token for every beam that is still generating, in every running
request: one batched decode forward (the beams' last tokens over their block tables; a CUDA
graph replay when the runner has them), the EFT rows steered by the small models
(search/eft.py), and one sampling call for all rows, each seeded by (request seed, beam,
position). The sampling parameters ride in the decode's upload, and the sampled tokens come
back in one copy: one upload and one sync per step. The detokenizer turns each beam's tokens
into text incrementally, for stop strings, the bridge to other tokenizers and the result.
With async_scheduling, a step is launched before the previous step's tokens are read (its
carried rows fed them on the device), and they are recorded while the device computes.
At a chunk's first step the K children of a survivor feed the same token (its last) over the
same history (its blocks, forked): one row forwards it for all of them, and each samples its
own token from that row's logits (sibling_rows), as a prompt's children sample from its
prefill's.
"""

import numpy as np
import torch
from torch.profiler import record_function   # names the read of a step in a profile

from w2s_engine.cache.block_manager import BlockManager, BlockTable
from w2s_engine.kernels.sampling import adjust_logits, sample
from w2s_engine.large.guide import Guides, apply_bitmask
from w2s_engine.large.in_flight import DecodeStep, DeviceRead, LogprobRows, continues_after
from w2s_engine.large.sampling_words import (adjustment_tensors, adjustment_words,
                                             sampling_tensors, sampling_words)
from w2s_engine.models.runner import BatchFailed, ModelRunner
from w2s_engine.params import InvalidParam, SearchParams
from w2s_engine.search.bridge import Detokenizer
from w2s_engine.search.eft import EFT
from w2s_engine.search.prompts import check_context
from w2s_engine.search.request import RequestStatus, SearchRequest
from w2s_engine.search.sequence import Beam
from w2s_engine.search.tokens import encode


def sibling_rows(fed: list) -> tuple[list, list]:
    """The fed rows (request, beam) to forward, and the others: [((request, beam), j)], each
    to sample from the forward of row j of the first list (whose rows follow the carried
    ones). The children of one survivor, at their chunk's first step, feed its last token
    over its history (their tables are its own, forked, or losers' made its), so their
    forwards are one; each samples its own token from it (its seed is its beam's). Checked,
    not assumed: the same table, length and token."""
    forwarded, siblings, first_of = [], [], {}
    for r, b in fed:
        key = (id(r), b.parent_id) if b.chunk_tokens == 0 and r.params.method != "eft" \
            else None
        if key in first_of:
            j = first_of[key]
            other = forwarded[j][1]
            if other.large.blocks == b.large.blocks and \
                    other.large.num_tokens == b.large.num_tokens and \
                    other.token_ids[-1] == b.token_ids[-1]:
                siblings.append(((r, b), j))
                continue
        elif key is not None:
            first_of[key] = len(forwarded)
        forwarded.append((r, b))
    return forwarded, siblings


class LocalLarge:

    def __init__(self, runner: ModelRunner, tokenizer, eos_ids: set[int], blocks: BlockManager,
                 async_scheduling: bool = False):
        self.runner = runner
        self.async_scheduling = async_scheduling
        self.in_flight: DecodeStep | None = None   # launched, its tokens not read yet
        self.carried_failures: list = []   # recorded before a failed batch, not yet returned
        self.decode_steps = 0              # launched so far
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.blocks = blocks
        self.detokenizer = Detokenizer(tokenizer)
        self.eft: EFT | None = None   # set by the engine when its models can run EFT
        # An LM head padded past the tokenizer (Qwen2.5, Phi-3) has rows that are no token:
        # never sampled (a small model sharing the tokenizer could not even embed them).
        rows = runner.shape.vocab_size
        self.token_limit = len(tokenizer) if len(tokenizer) < rows else None
        self.guides = Guides(tokenizer, min(len(tokenizer), rows), set(eos_ids))

    def check_params(self, params: SearchParams):
        """Fit the parameters to this model's vocabulary: a top_k at or past it keeps every
        token, as transformers' top-k warper does (clamped, not refused); a logit_bias id
        or stop token id past it is refused."""
        vocab = self.runner.shape.vocab_size
        params.top_k = min(params.top_k, vocab)
        for token in params.logit_bias:
            if token >= vocab:
                raise InvalidParam(f"logit_bias.{token}", token, "not a token id of the large "
                                   f"model, whose vocabulary is [0, {vocab})")
        for token in params.stop_token_ids:
            if token >= vocab:
                raise InvalidParam("stop_token_ids", token, "not a token id of the large "
                                   f"model, whose vocabulary is [0, {vocab})")
        tokens = self.token_limit or vocab    # (an LM head's padding rows are no token)
        for token in params.allowed_token_ids:
            if token >= tokens:
                raise InvalidParam("allowed_token_ids", token, "not a token id of the large "
                                   f"model, whose vocabulary is [0, {tokens})")
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        if params.min_tokens and params.allowed_token_ids and set(
                params.allowed_token_ids) <= ends:
            raise InvalidParam("allowed_token_ids", params.allowed_token_ids, "every allowed "
                               "token ends the response, which min_tokens bans before its "
                               "min_tokens tokens: allow another token, or leave min_tokens out")

    def check_bans(self, params: SearchParams, bad_word_ids):
        """Refuse bad_words whose one-token words ban every allowed token (every one left by
        min_tokens' ban of the end): no token would be left to sample."""
        if not params.allowed_token_ids:
            return
        left = set(params.allowed_token_ids) - {w[0] for w in bad_word_ids if len(w) == 1}
        if params.min_tokens:
            left -= set(params.stop_token_ids) | (set() if params.ignore_eos
                                                  else set(self.eos_ids))
        if not left:
            raise InvalidParam("bad_words", params.bad_words, "the bad_words ban every allowed "
                               "token (allowed_token_ids)" + (" that min_tokens does not" if
                                                             params.min_tokens else "") +
                               ": allow another token, or ban fewer words")

    def compile_guide(self, spec: dict):
        """params.structured_output compiled against this model's vocabulary (InvalidParam
        where it is no grammar xgrammar reads)."""
        return self.guides.compile(spec)

    def new_guide(self, r: SearchRequest):
        """A root beam's matcher at its structured output's start."""
        return self.guides.matcher(r.grammar, r.params.stop_token_ids)

    def bad_word_ids(self, words: list[str]) -> tuple[tuple[int, ...], ...]:
        """vLLM's bad_words as token sequences: each word's tokens, and those of the word after
        a space where that is another word's tokens of the same length (a word at the text's
        start and one within it)."""
        sequences = []
        for word in words:
            alone = tuple(encode(self.tokenizer, word.lstrip(), False))
            spaced = tuple(encode(self.tokenizer, " " + word.lstrip(), False))
            sequences.append(alone)
            if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
                sequences.append(spaced)
        return tuple(s for s in sequences if s)

    def encode_prompt(self, text: str, special: bool, max_new_tokens: int) -> list[int]:
        ids = encode(self.tokenizer, text, special)
        check_context("large", self.runner.shape.max_positions, len(ids), max_new_tokens)
        return ids

    def new_table(self) -> BlockTable:
        return self.blocks.new_table()

    def prefill(self, requests: list[SearchRequest], max_tokens: int) -> list[SearchRequest]:
        """Forward the next chunk of these prompts (in order, max_tokens in all) in one batch;
        returns the requests whose prompts are all in (now or before), their last logits
        kept."""
        items, parts = [], []
        for r in requests:
            if max_tokens <= 0:
                break
            if not r.root.large.blocks:     # its first chunk: what the prefix cache holds
                r.prefilled = self.blocks.take_cached_prefix(r.root.large, r.large_prompt_ids)
                r.stats.cached_prompt_tokens["large"] = r.prefilled
            take = min(len(r.large_prompt_ids) - r.prefilled, max_tokens)
            if take <= 0:
                continue        # in already: its small models' prompts are still going in
            self.blocks.append(r.root.large, take)
            items.append((r.root.large, r.large_prompt_ids[r.prefilled:r.prefilled + take]))
            r.prefilled += take
            parts.append(r)
            max_tokens -= take
        if items:
            hidden, cu = self.runner.run(items)
            for r, (_, ids) in zip(parts, items):   # counted as it is done: a request ended
                forwarded = r.stats.tokens_forwarded   # part-way counts the work it took
                forwarded["large"] = forwarded.get("large", 0) + len(ids)
            done = [i for i, r in enumerate(parts) if r.prefilled == len(r.large_prompt_ids)]
            for i in done:
                self.blocks.cache_prompt(parts[i].root.large, parts[i].large_prompt_ids)
            if done:
                ends = self.runner.upload([cu[i + 1] - 1 for i in done]).long()
                last = self.runner.compute_logits(hidden[ends])
                for j, i in enumerate(done):
                    parts[i].root_logits = last[j]
        return [r for r in requests if r.prefilled == len(r.large_prompt_ids)]

    @property
    def runs_ahead(self) -> bool:
        """Whether a decode step is in flight (async scheduling): work the engine queues now
        runs after it, and can be read next step without the device waiting."""
        return self.in_flight is not None

    def advance(self, requests: list[SearchRequest]) -> list[tuple[SearchRequest, str]]:
        """One token for every generating beam of every running request. Returns the requests
        that failed alone (recording a token), with why. When the batch's forward or sampling
        fails, raises BatchFailed: retryable when every beam is back as it was (the slots this
        step appended are rolled back), so the engine can run each request again alone.

        With async_scheduling, each step is left in flight: the next call launches the
        following step first, its carried rows fed the tokens on the device (the large
        model's and, for EFT, the small models'), and only then reads this one's tokens and
        records them, so the host's recording and the next step's preparation run while the
        device computes. A beam whose token in flight ends its chunk waits for the read
        (continues_after)."""
        failed, self.carried_failures = self.carried_failures, []
        ahead, self.in_flight = self.in_flight, None
        try:
            try:
                step = self._launch(requests, ahead)
            except BatchFailed:
                if ahead is not None:   # its tokens are good: record them before the retries
                    failed += self._collect(ahead)
                raise
            if ahead is not None:
                failed += self._collect(ahead, step)
            if step is not None:
                self.decode_steps += 1
                if self.async_scheduling:
                    self.in_flight = step
                else:
                    failed += self._collect(step)
        except BatchFailed:
            self.carried_failures = failed   # returned by the next call (the retries' first)
            raise
        once = {id(r): (r, why) for r, why in reversed(failed)}   # a request fails once
        return list(once.values())

    def _launch(self, requests: list[SearchRequest], ahead: DecodeStep | None):
        """Queue a decode step for the generating beams of these requests: slots, the forward,
        steering, sampling, and the copy of its tokens to the host (not waited for). Rows
        whose last token is still in flight in `ahead` come first and are fed it from the
        device. None when no beam generates."""
        pending = {} if ahead is None else {id(b): i for i, (r, b) in enumerate(ahead.order)
                                            if r.status is RequestStatus.RUNNING
                                            and not b.finished}
        # A beam whose token in flight ends its chunk (or its length) waits for the read.
        work = [(r, b) for r in requests for b in r.generating
                if id(b) not in pending or continues_after(r, b)]
        if not work:
            return None
        carried = [(r, b) for r, b in work if id(b) in pending]
        fed = [(r, b) for r, b in work if id(b) not in pending and b.token_ids]
        first = [(r, b) for r, b in work if id(b) not in pending and not b.token_ids]
        fed, siblings = sibling_rows(fed)
        forward = carried + fed
        fed_rows = forward + [row for row, _ in siblings]     # the rows that take a slot
        order = forward + first + [row for row, _ in siblings]
        words = sampling_words(order, len(carried))
        # Slots for the new tokens; a copy-on-write copy cannot be taken back, so a failure
        # here is not retryable (the pool or the device is in trouble, not one request).
        before = [(b.large, b.large.num_tokens) for _, b in fed_rows]
        try:
            copies = []
            for _, b in forward:
                copies += self.blocks.append(b.large, 1)
            for (_, b), j in siblings:     # the slot its forwarded sibling writes, shared
                self.blocks.fork_into(b.large, fed[j][1].large)
            self.runner.copy_blocks(copies)
        except Exception as e:
            raise BatchFailed(retryable=False) from e
        # The EFT rows' small states, given back if the step fails after steering some of them
        eft_before = self.eft.save(forward + first) if self.eft is not None else []
        try:
            rows, steered, raw = [], [], []
            if forward:
                tokens_from = None
                if carried:
                    tokens_from = (ahead.sampled,
                                   np.array([pending[id(b)] for _, b in carried], np.int32))
                # Each row's request, for the cascade's groups (prefix caching shares first
                # blocks across requests); only they read it.
                requests = None
                if getattr(self.runner.graphs, "cascade", False):
                    index = {}
                    requests = np.fromiter((index.setdefault(id(r), len(index))
                                            for r, _ in forward), np.int64, count=len(forward))
                logits, params = self.runner.decode_logits(
                    [(b.large, b.token_ids[-1] if i >= len(carried) else 0)
                     for i, (_, b) in enumerate(forward)], words, tokens_from, requests)
                raw.append(logits)
                rows.append(self._steer(logits, forward, 0, steered, tokens_from))
            else:
                params = self.runner.upload(words)
            if first:
                # Beams with no token yet sample from their root's prompt logits: no forward.
                logits = torch.stack([r.root_logits for r, _ in first])
                raw.append(logits)
                rows.append(self._steer(logits, first, len(forward), steered))
            if siblings:
                # Their forwarded siblings' logits (no EFT row: those are not siblings).
                shared = self.runner.upload([len(carried) + j for _, j in siblings]).long()
                raw.append(raw[0][shared])
                rows.append(raw[-1])
            logits = torch.cat(rows) if len(rows) > 1 else rows[0]
            logprobs = LogprobRows(order, raw, self.runner.upload,   # before penalties
                                   self.token_limit)
            if self.token_limit is not None:   # in place: the logits are the step's own
                logits[:, self.token_limit:] = float("-inf")
            adjustments = adjustment_words(order, self.eos_ids,
                                           [pending[id(b)] for _, b in carried])
            if adjustments is not None:
                adjust, sizes = adjustments
                logits = adjust_logits(logits, *adjustment_tensors(
                    self.runner.upload(adjust), *sizes,
                    in_flight=ahead.sampled if carried else None))
            guided = [i for i, (_, b) in enumerate(order) if b.guide is not None]
            if guided:     # (never carried: a guided beam waits for its token's read)
                bitmask = self.guides.bitmask([order[i][1].guide for i in guided])
                logits = apply_bitmask(logits, self.runner.upload(guided).long(),
                                       self.runner.upload(bitmask).view(len(guided), -1),
                                       self.guides.vocab_size)
            *sampling, min_p = sampling_tensors(params, len(order))
            uses_min_p = any(r.params.min_p for r, _ in order)
            sampled = sample(logits, *sampling, min_p if uses_min_p else None)
            # One read for the step: the tokens, the log-probs asked for, the EFT terms.
            riders = logprobs.queue(sampled)
            if steered:
                riders.append(self.eft.terms(steered, sampled))
            read = DeviceRead([sampled] + riders)
        except Exception as e:
            self._roll_back(before)
            if self.eft is not None:    # steered rows too, not only a failed steering's
                self.eft.restore(eft_before)
            raise BatchFailed(retryable=True) from e
        return DecodeStep(order, sampled, read, logprobs, steered, before,
                          {id(b) for _, b in fed_rows}, len(forward))

    def _collect(self, step: DecodeStep, after: DecodeStep | None = None):
        """Read a launched step's tokens (the one wait) and record them, skipping the rows of
        requests that ended and of beams that finished since it was launched. `after`: the
        step launched on top of this one; a beam that finishes here gives back the slot that
        step appended for it (its row there is dropped when that step is collected). If the
        read fails, both steps' slots are rolled back and BatchFailed is raised."""
        try:
            with record_function("w2s.large.read"):
                tokens, *host = step.read.result()
        except Exception as e:
            for s in (after, step):
                if s is not None:
                    self._roll_back(s.before)
            raise BatchFailed(retryable=not step.steered) from e
        tokens = [int(t) for t in tokens]
        logprobs = step.logprobs.entries(tokens, host[:len(host) - bool(step.steered)])
        order = step.order
        failed = {}   # id(request) -> (request, why)
        recorded = set()   # rows whose token is the beam's
        for i, ((r, b), tok) in enumerate(zip(order, tokens)):
            if id(r) in failed or r.status is not RequestStatus.RUNNING or b.finished:
                continue
            try:
                n = len(b.token_ids)
                if n and i < step.forwarded:   # a sibling's token was fed by another row
                    r.stats.tokens_forwarded["large"] += 1
                r.record_token(b, tok, self.eos_ids, self.text_as_it_stands)
                if i in logprobs and len(b.token_ids) > n:   # (EOS is not a returned token)
                    r.record_logprob(b, logprobs[i])
                recorded.add(i)
            except Exception as e:   # a request's own text (stop strings, detokenizing)
                failed[id(r)] = (r, f"{type(e).__name__} while recording a token: {e}")
            if b.finished and after is not None and id(b) in after.appended:
                self.blocks.truncate(b.large, b.large.num_tokens - 1)
        if step.steered:
            self.eft.record(step.steered, tokens, host[-1],
                            skip=lambda s: s.row not in recorded or id(order[s.row][0]) in failed)
            for s in step.steered if after is not None else ():
                # EOS was fed to the small models in flight too, but it is no token of theirs
                st = s.beam.small[0]
                if id(s.beam) in after.appended and st.table.num_tokens > len(st.ids):
                    self.eft.stream.blocks.truncate(st.table, len(st.ids))
        return list(failed.values())

    def _roll_back(self, before: list):
        """Give back the slots a step appended: each (table, tokens before the step); a table
        freed since holds none."""
        for table, n in before:
            self.blocks.truncate(table, min(n, table.num_tokens))

    def _steer(self, logits, items, row_offset: int, steered: list, in_flight=None):
        if self.eft is None:
            return logits
        logits, rows = self.eft.steer(logits, items, row_offset, in_flight)
        steered += rows
        return logits

    def drop(self, r: SearchRequest):
        """Nothing runs for one request alone here: a decode step in flight is the batch's,
        and it records no token of an ended request."""

    def response_text(self, b: Beam) -> str:
        """The response as text (incrementally decoded), cut before a matched stop string."""
        text = self.detokenizer.update(b.detok, b.token_ids, flush=b.finished)
        return text if b.stop_text_len is None else text[:b.stop_text_len]

    def text_as_it_stands(self, b: Beam) -> str:
        """The response's text with what the detokenizer holds back of a run of byte tokens
        (its complete characters): where stop strings and min_tokens' text are measured."""
        self.detokenizer.update(b.detok, b.token_ids, flush=b.finished)
        return self.detokenizer.unsettled(b.detok, b.token_ids)

    def num_tokens(self, b: Beam) -> int:
        return len(b.token_ids)
