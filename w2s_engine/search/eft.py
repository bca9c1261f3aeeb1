"""EFT / proxy-tuning: sample from logits_large + beta * (logits_tuned - logits_untuned), token by
token.

A peer of the search on the same machinery (Mitchell et al. 2023, Liu et al. 2024), for
comparison: it needs the three models to share one vocabulary, so the sampled ids go to the
small models as they are. The small models step in lockstep with the large one, on the
beam's own small stream: each step forwards the token sampled at the last step and reads
both models' next-token logits (SmallStream.next_logits: a decode on the small models'
graphs where they have them), and steers the large model's logits with them. After
sampling, the token's term log pi_tuned - log pi_untuned is recorded as the stream's pending
token, so the reward of an EFT sample equals the implicit reward of the same response scored
by Engine.score.
"""

from dataclasses import dataclass

import numpy as np
import torch

from w2s_engine.search.sequence import Beam
from w2s_engine.search.small_stream import SmallStream


@dataclass
class Steered:
    """One EFT row of a steered batch: its beam and where its small models' log-probs are."""

    row: int                         # the row in the batch of logits
    beam: Beam
    logp: dict[str, torch.Tensor]    # role -> [E, V]: the log-probs of the steered rows
    index: int                       # this row's among them


class EFT:

    def __init__(self, stream: SmallStream, vocab_size: int, weight: float = 1.0):
        assert stream.roles == ("tuned", "untuned"), "EFT needs both models on one stream"
        self.stream = stream
        self.weight = weight           # the implicit reward's, in the reported reward
        self.vocab_size = vocab_size   # the large tokenizer's; the small models' logits are cut to it

    def steer(self, logits: torch.Tensor, items: list, row_offset: int = 0,
              in_flight: tuple[torch.Tensor, np.ndarray] | None = None):
        """Steer the rows of EFT requests in `logits` [B, V] (items: (request, beam) per row).
        Returns (logits, [Steered]); record() takes the Steered rows after sampling.
        in_flight: (tokens [P] on the device, rows): the first len(rows) items' last token is
        tokens[row], sampled by a step not read yet (async scheduling); their small models
        are fed it from the device."""
        rows = [i for i, (r, _) in enumerate(items) if r.params.method == "eft"]
        if not rows:
            return logits, []
        eft = [items[i] for i in rows]
        states = [b.small[0] for _, b in eft]
        tokens_from = None
        if in_flight is not None:
            tokens, sources = in_flight
            carried = [sources[i] for i in rows if i < len(sources)]   # a prefix of rows
            if carried:
                tokens_from = (tokens, np.array(carried, np.int32))
        # A failure part-way gives each state back as it was (its slots, its last hidden
        # state), so that the large model's step can run again, each request alone.
        before = self.save(eft)
        try:
            logits_small, fed = self.stream.next_logits(states, tokens_from)
        except Exception:
            self.restore(before)
            raise
        for (r, _), n in zip(eft, fed):
            for role in self.stream.roles:
                r.stats.tokens_forwarded[role] += n
        # Normalized over the whole head (as the scorer and score() do: a padded head's rows
        # count), then cut to the large tokenizer's tokens for the mixing.
        logp = {role: torch.log_softmax(x, dim=-1)[:, :self.vocab_size]
                for role, x in logits_small.items()}
        v = self.vocab_size
        logits = logits.clone()
        # The rows and each row's beta (fp32 bits) in one asynchronous upload.
        betas = np.array([r.params.beta for r, _ in eft], dtype=np.float32).view(np.int32)
        words = self.stream.upload(np.concatenate([np.array(rows, dtype=np.int32), betas]))
        index = words[:len(rows)].long()
        beta = words[len(rows):].view(torch.float32)[:, None]
        # DESIGN.md's mix is of logits. Log-probs differ from them by a shift per row, which
        # sampling ignores, but a repetition penalty (positive and negative logits scaled
        # apart) does not.
        combined = logits[index, :v] + beta * (logits_small["tuned"][:, :v]
                                               - logits_small["untuned"][:, :v])
        logits[index] = float("-inf")
        logits[index, :v] = combined
        return logits, [Steered(row_offset + i, b, logp, j)
                        for j, (i, (_, b)) in enumerate(zip(rows, eft))]

    def save(self, items: list) -> list:
        """The small states of the EFT rows among items ((request, beam) per row) as they are:
        their slots, last hidden states and the tokens their requests forwarded, for
        restore() when the step that steers them fails (a later steering or the sampling
        too: the step runs again, each request alone, and must steer the same way)."""
        return [(b.small[0], b.small[0].table.num_tokens, dict(b.small[0].last_hidden), r,
                 dict(r.stats.tokens_forwarded))
                for r, b in items if r.params.method == "eft"]

    def restore(self, saved: list):
        """Each saved state back as save() found it (the slots appended since freed)."""
        for st, n, hidden, r, forwarded in saved:
            self.stream.blocks.truncate(st.table, min(n, st.table.num_tokens))
            st.last_hidden = hidden
            r.stats.tokens_forwarded.clear()
            r.stats.tokens_forwarded.update(forwarded)

    def terms(self, steered: list[Steered], sampled: torch.Tensor) -> torch.Tensor:
        """After sampling (sampled: the batch's tokens [B], on the device): each steered row's
        term log pi_tuned - log pi_untuned at its token, [S] in steered's order, on the
        device; the caller reads them with the tokens. (A token that is an EOS id gives the
        EOS term: the id sampled, as the scorer scores it.)"""
        parts = []
        for group in runs(steered):
            g = len(group)
            words = self.stream.upload([s.index for s in group] + [s.row for s in group]).long()
            index, token = words[:g], sampled[words[g:]].long()
            tuned, untuned = group[0].logp["tuned"], group[0].logp["untuned"]
            parts.append(tuned[index, token] - untuned[index, token])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def record(self, steered: list[Steered], tokens: list[int], terms: list[float],
               skip=lambda s: False):
        """Each steered beam's reward term (terms: terms() read back, [S]), but the rows
        `skip` names (of failed requests; with async scheduling, rows of beams that had
        stopped before the step was read)."""
        for s, term in zip(steered, terms):
            if skip(s):
                continue
            b, t = s.beam, tokens[s.row]
            if b.finished and b.eos_token == t:   # an EOS or stop token id ended it
                b.eos_term = term
            else:
                b.small[0].add_pending(t, term)
            b.reward = self.weight * (sum(b.small[0].terms) + b.eos_term)


def runs(steered: list[Steered]) -> list[list[Steered]]:
    """The steered rows by the batch of log-probs they index (one per steer call, in order)."""
    out = []
    for s in steered:
        if out and out[-1][0].logp["tuned"] is s.logp["tuned"]:
            out[-1].append(s)
        else:
            out.append([s])
    return out
