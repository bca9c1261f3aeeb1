"""HeadStream: a reward model's token stream on its own paged KV, read by its head at the end.

The stream of a beam is the reward model's rendering of prompt + response: the prompt part,
the response in the reward model's tokens, then the template's suffix (an end-of-turn token,
say), whose last token is where the classification head reads the reward. Each update brings
the stream to the beam's new rendering: the common prefix with what is cached stays, the rest
(the old suffix, a re-tokenized tail) is rolled back, and only the new tokens are forwarded,
all beams of all requests in one forward. A chunk of L tokens costs L + |suffix| tokens.
"""

import torch

from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.models.runner import ModelRunner
from w2s_engine.search.sequence import SmallState
from w2s_engine.search.small_stream import StreamUpdate, batches
from w2s_engine.search.tokens import common_prefix


class HeadStream:

    def __init__(self, role: str, runner: ModelRunner, blocks: BlockManager, head_index: int,
                 max_batch_tokens: int):
        head = getattr(runner.model, "score", None)
        assert head is not None, "a reward model needs a classification head (model.score)"
        assert 0 <= head_index < head.out_features, "head_index past the head's outputs"
        self.runners = {role: runner}
        self.runner = runner
        self.head = head
        self.head_index = head_index
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.runners)

    def prefill(self, states: list[SmallState]):
        """Forward the prompt part of fresh states (ids set, table empty)."""
        copies = []
        for st in states:
            assert st.table.num_tokens == 0 and st.ids, "a prompt needs at least one token"
            copies += self.blocks.append(st.table, len(st.ids))
        self.runner.copy_blocks(copies)
        for chunk in batches([(st.table, st.ids) for st in states], self.max_batch_tokens):
            self.runner.run(chunk)

    def update(self, updates: list[StreamUpdate]) -> None:
        """Advance every state to its full_ids and read the head at the last token."""
        feeds, plans, copies = [], [], []
        for u in updates:
            st = u.state
            c = common_prefix(st.ids, u.full_ids)
            if c == len(st.ids) == len(u.full_ids) and st.table.num_tokens == c:
                plans.append((u, None, 0))    # unchanged: its value stands
                continue
            feed_from = min(c, len(u.full_ids) - 1)   # the last token is always read afresh
            self.blocks.truncate(st.table, feed_from)
            feed = u.full_ids[feed_from:]
            copies += self.blocks.append(st.table, len(feed))
            feeds.append((st.table, feed))
            plans.append((u, len(feeds) - 1, len(feed)))
        self.runner.copy_blocks(copies)
        last = []
        for chunk in batches(feeds, self.max_batch_tokens):
            hidden, cu = self.runner.run(chunk)
            last.append(hidden[(cu[1:] - 1).long()])
        values = self._read(torch.cat(last)) if last else []
        for u, fi, fed in plans:
            st = u.state
            st.ids = list(u.full_ids)
            st.response_start = u.response_start
            if u.starts is not None:
                st.text, st.starts = u.text, u.starts
            if fi is not None:
                st.value = values[fi]
            u.forwarded, u.scored = fed, int(fi is not None)

    @torch.inference_mode()
    def _read(self, hidden: torch.Tensor) -> list[float]:
        """The head's output `head_index` at each row of hidden [N, H]."""
        return self.head(hidden)[:, self.head_index].float().tolist()
