"""EFT / proxy-tuning: sample from logits_large + beta * (logp_tuned - logp_untuned), token by token.

A peer of the search on the same machinery (Mitchell et al. 2023, Liu et al. 2024), for
comparison: it needs the three models to share one vocabulary, so the sampled ids go to the
small models as they are. The small models step in lockstep with the large one, on the
beam's own small stream: each step forwards the token sampled at the last step
(SmallStream.forward_pending), reads both models' next-token log-probs from the final hidden
states, and steers the large model's logits with them. After sampling, the token's term
log pi_tuned - log pi_untuned is recorded as the stream's pending token, so the reward of an
EFT sample equals the implicit reward of the same response scored by Engine.score.
"""

from dataclasses import dataclass

import torch

from w2s_engine.search.sequence import Beam
from w2s_engine.search.small_stream import SmallStream


@dataclass
class Steered:
    """One EFT row of a steered batch: its beam and both small models' log-probs."""

    row: int                     # the row in the batch of logits
    beam: Beam
    logp_tuned: torch.Tensor     # [V]
    logp_untuned: torch.Tensor   # [V]


class EFT:

    def __init__(self, stream: SmallStream, vocab_size: int, large_eos: set[int],
                 weight: float = 1.0):
        assert stream.roles == ("tuned", "untuned"), "EFT needs both models on one stream"
        self.stream = stream
        self.weight = weight           # the implicit reward's, in the reported reward
        self.vocab_size = vocab_size   # the large tokenizer's; the small models' logits are cut to it
        self.large_eos = large_eos

    def steer(self, logits: torch.Tensor, items: list, row_offset: int = 0):
        """Steer the rows of EFT requests in `logits` [B, V] (items: (request, beam) per row).
        Returns (logits, [Steered]); record() takes the Steered rows after sampling."""
        rows = [i for i, (r, _) in enumerate(items) if r.params.method == "eft"]
        if not rows:
            return logits, []
        eft = [items[i] for i in rows]
        states = [b.small[0] for _, b in eft]
        fed = self.stream.forward_pending(states)
        for (r, _), n in zip(eft, fed):
            for role in self.stream.roles:
                r.stats.tokens_forwarded[role] += n
        logp = {}
        for role, runner in self.stream.runners.items():
            hidden = torch.stack([st.last_hidden[role] for st in states])
            logp[role] = torch.log_softmax(runner.compute_logits(hidden)[:, :self.vocab_size], dim=-1)
        v = self.vocab_size
        logits = logits.clone()
        index = torch.tensor(rows, device=logits.device)
        beta = torch.tensor([r.params.beta for r, _ in eft], device=logits.device)[:, None]
        combined = logits[index, :v] + beta * (logp["tuned"] - logp["untuned"])
        logits[index] = float("-inf")
        logits[index, :v] = combined
        return logits, [Steered(row_offset + i, b, logp["tuned"][j], logp["untuned"][j])
                        for j, (i, (_, b)) in enumerate(zip(rows, eft))]

    def record(self, steered: list[Steered], tokens: list[int]):
        """After sampling (tokens: one per row of the batch): each EFT beam's reward term."""
        for s in steered:
            b, token = s.beam, tokens[s.row]
            if b.finished and b.finish_reason == "stop" and token in self.large_eos:
                eos = self.stream.eos_id
                b.eos_term = float(s.logp_tuned[eos] - s.logp_untuned[eos])
            else:
                b.small[0].add_pending(token, float(s.logp_tuned[token] - s.logp_untuned[token]))
            b.reward = self.weight * (sum(b.small[0].terms) + b.eos_term)
