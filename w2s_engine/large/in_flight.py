"""A launched decode step until its tokens are read, and which of its rows the next step takes.

The step's one copy back to the host carries the sampled tokens, the log-probs the requests
asked for (LogprobRows) and EFT's reward terms (DeviceRead: queued when the step is launched,
waited for when it is read). With async scheduling the next step is launched before this one
is read: its carried rows' next inputs are then this step's tokens on the device, and a row
whose token ends its chunk or its length waits for the read (continues_after).
"""

from dataclasses import dataclass

import torch

from w2s_engine.outputs import TokenLogprob


class DeviceRead:
    """Device tensors on their way to the host in one copy (through fp64 when there are
    several: exact for token ids and fp32 values): queued at once, waited for by result(),
    so the host can queue more work in between."""

    def __init__(self, parts: list[torch.Tensor]):
        assert all(p.dim() in (1, 2) for p in parts)
        self.shapes = [tuple(p.shape) for p in parts]
        flat = parts[0] if len(parts) == 1 else torch.cat([p.double().ravel() for p in parts])
        self.done = None
        if flat.device.type == "cuda":
            self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = flat

    def result(self) -> list:
        """Each part's .tolist(), after the one wait."""
        if self.done is not None:
            self.done.synchronize()
        host = self.host.tolist()
        if len(self.shapes) == 1:
            return [host]
        out, at = [], 0
        for shape in self.shapes:
            size = shape[0] * (shape[1] if len(shape) == 2 else 1)
            flat = host[at:at + size]
            at += size
            if len(shape) == 2:
                flat = [flat[i * shape[1]:(i + 1) * shape[1]] for i in range(shape[0])]
            out.append(flat)
        return out


class LogprobRows:
    """The large model's log-probs at the rows of requests that asked for them, from the raw
    logits (before EFT steering and sampling's temperature and filters); computed only when
    some request asked. Nothing is read here: `queue` gives what to read in the same copy as
    the sampled tokens, so a step that returns log-probs still waits once."""

    def __init__(self, order, raw: list[torch.Tensor], upload, token_limit: int | None = None):
        """token_limit: the tokenizer's size where the LM head has more rows (Qwen2.5's
        padding): those rows are no tokens, neither alternatives nor part of the softmax."""
        self.rows = [i for i, (r, _) in enumerate(order) if r.logprobs is not None]
        if not self.rows:
            return
        logits = torch.cat(raw) if len(raw) > 1 else raw[0]
        self.index = upload(self.rows).long()
        self.logp = torch.log_softmax(logits[self.index, :token_limit].float(), dim=-1)
        self.counts = [min(order[i][0].logprobs, self.logp.shape[1]) for i in self.rows]
        self.top_values, self.top_ids = self.logp.topk(max(self.counts), dim=-1)

    def queue(self, sampled: torch.Tensor) -> list[torch.Tensor]:
        """What to read with the sampled tokens [B] (on the device): the sampled tokens'
        log-probs, then the alternatives' ids and log-probs ([] if no row asked)."""
        if not self.rows:
            return []
        chosen = self.logp.gather(1, sampled[self.index][:, None].long())[:, 0]
        return [chosen, self.top_ids, self.top_values]

    def entries(self, tokens: list[int], host: list) -> dict[int, TokenLogprob]:
        """Row -> the sampled token's entry, for the rows that asked; host: queue()'s tensors
        read back."""
        if not self.rows:
            return {}
        chosen, ids, values = host
        return {row: TokenLogprob(tokens[row], chosen[j],
                                  [(int(ids[j][i]), values[j][i]) for i in range(count)])
                for j, (row, count) in enumerate(zip(self.rows, self.counts))}


@dataclass
class DecodeStep:
    """A launched decode step: its rows, its tokens on the device and on their way to the
    host, and what recording them needs."""

    order: list                  # (request, beam) per row
    sampled: torch.Tensor        # [B] int64 on the device
    read: DeviceRead             # the tokens, then the log-probs and EFT terms asked for
    logprobs: LogprobRows
    steered: list                # EFT's rows (search/eft.py Steered)
    before: list                 # (table, tokens before the step) of the rows it fed
    appended: set[int]           # id(beam) of those rows
    forwarded: int               # the first rows, which it forwarded (the others sample from
                                 # a sibling's forward, or from their prompt's logits)


def continues_after(r, b) -> bool:
    """A beam with a token in flight samples again in its chunk after that token (unless the
    token is its EOS or completes a stop string, which only the read tells). One that ends
    its chunk or its length is left out of the next step: its request scores, selects and
    forks once the tokens are read, and its next chunk joins the step after."""
    p = r.params
    # (a structured output's next mask needs the token: large/guide.py)
    return b.chunk_tokens + 1 < p.chunk_len and len(b.token_ids) + 1 < p.max_new_tokens \
        and b.guide is None
