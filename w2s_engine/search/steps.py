"""How a process reward model sees a response: steps, each followed by a tag it scores.

A step ends at each separator in the response ("\\n\\n"), or at each chunk end the search
recorded (marks). The PRM reads the text with the tag inserted where each finished step ends
(before its separator), and, after an unfinished last step, the tag once more for the read
(rolled back at the next chunk, as a reward model's suffix is). Scores of the steps are then
aggregated into one reward.
"""

import math

from w2s_engine.scoring import AGGREGATES


def tag_steps(text: str, tag: str, separator: str | None,
              marks: list[int]) -> tuple[str, bool, list[int]]:
    """(the response with a tag after each finished step, whether an unfinished step follows,
    where each inserted tag starts in it). The offsets tell the tags from the same text in
    the response itself, which is no step's end. An empty response is one empty, unfinished
    step, read at the tag right after the prompt: the PRM's own judgment of nothing written
    yet (search-and-learn scores an empty completion so), not a made-up 0.0."""
    if not text:
        return "", True, []
    if separator is not None:
        parts = text.split(separator)
        offsets, at = [], 0
        for part in parts[:-1]:
            at += len(part)
            offsets.append(at)
            at += len(tag) + len(separator)
        return (tag + separator).join(parts), bool(parts[-1]), offsets
    out, last, offsets, at = [], 0, [], 0
    for end in marks:
        if end > len(text):
            break       # a chunk end past a stop string's cut: the cut text has no such step
        out += [text[last:end], tag]
        at += end - last
        offsets.append(at)
        at += len(tag)
        last = end
    return "".join(out) + text[last:], len(text) > last, offsets


def aggregate(values: list[float], how: str) -> float:
    """One reward from the step scores (0.0 for none: no response has none, tag_steps)."""
    assert how in AGGREGATES
    if not values:
        return 0.0
    if how == "last":
        return values[-1]
    if how == "min":
        return min(values)
    if how == "product":
        return math.prod(values)
    return sum(values) / len(values)
