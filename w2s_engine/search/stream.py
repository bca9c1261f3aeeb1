"""Streaming a search: send each part of the answer as soon as it is final.

Every later candidate of a chunk-level search descends from a current one, and a beam's
response text only grows (the detokenizer holds back an incomplete character; a black box
appends), so the common prefix of the current candidates' texts is final: the answer starts
with it, whichever candidate wins. A stream sends that prefix as it grows (at a selection, or
token by token when the candidates agree: EFT, plain sampling of one stream, greedy), then the
rest of the winner when the search ends; the deltas concatenate to exactly the final text.

Plain sampling and EFT of n streams have n answers, each one beam from start to end: each
streams its own text token by token, at its own index. An unfinished beam's last (longest stop string - 1)
characters are held back: a stop string completed by the next token cuts the text before it.
"""

from dataclasses import dataclass

from w2s_engine.outputs import SearchResult


@dataclass
class SearchDelta:
    """Text that became final in one answer of a search (index: which of plain sampling's n
    streams; 0 for a search's one answer). The last delta of a search carries its result."""

    text: str
    index: int = 0
    result: SearchResult | None = None


def common_prefix_text(texts: list[str]) -> str:
    if not texts:
        return ""
    first, last = min(texts), max(texts)   # the common prefix of all is that of these two
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


class FinalText:
    """How much of each answer a request's stream has sent, and what to send next."""

    def __init__(self, method: str, stop: list[str]):
        self.per_beam = method in ("base", "eft")   # n answers, one beam each
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.sent: dict[int, str] = {}     # answer index -> text sent

    def _final(self, beam, text_of) -> str:
        text = text_of(beam)
        if beam.finished or not self.holdback:
            return text
        return text[:max(0, len(text) - self.holdback)]

    def update(self, beams, text_of) -> list[SearchDelta]:
        """Deltas for what became final among the current candidates."""
        if self.per_beam:
            finals = {i: self._final(b, text_of) for i, b in enumerate(beams)}
        else:
            finals = {0: common_prefix_text([self._final(b, text_of) for b in beams])}
        return [d for i, text in finals.items() if (d := self._delta(i, text)) is not None]

    def finish(self, result: SearchResult) -> list[SearchDelta]:
        """The rest of every answer; the last delta carries the result."""
        answers = result.hypotheses if self.per_beam else result.hypotheses[:1]
        deltas = []
        for i, h in enumerate(answers):
            sent = self.sent.get(i, "")
            assert h.text.startswith(sent), "a streamed prefix was not final"
            deltas.append(SearchDelta(h.text[len(sent):], i))
            self.sent[i] = h.text
        deltas[-1].result = result
        return deltas

    def _delta(self, index: int, text: str) -> SearchDelta | None:
        sent = self.sent.get(index, "")
        if len(text) <= len(sent):
            return None
        assert text.startswith(sent), "a streamed prefix was not final"
        self.sent[index] = text
        return SearchDelta(text[len(sent):], index)
