"""How a RewardModel or ProcessRewardModel spec (w2s_engine/scoring.py) becomes what the
scorer runs: the head its model is loaded with, the function that reads a value from a
hidden state, its template and, for a PRM, its steps."""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from w2s_engine.scoring import RewardModel
from w2s_engine.search.head_stream import head_probability, label_probability, score_head
from w2s_engine.search.prompts import ResponseTemplate
from w2s_engine.search.tokens import encode

log = logging.getLogger("w2s_engine")
# Text a step may end with, to find a step tag that merges with it into another token.
STEP_ENDINGS = ("a", "e", "s", "t", "th", "in", "1", ".", ",", ")", " ")


@dataclass
class Steps:
    """A process reward model's steps: where they end, the tag it scores, how to aggregate."""

    tag: str
    tag_id: int                 # the tag is one token
    separator: str | None       # None: a step per chunk
    aggregate: str


@dataclass
class RewardModelParts:
    """A loaded (process) reward model as the scorer takes it."""

    role: str                   # its name in stats ("reward_model", "reward_model_2", ...)
    runner: object              # ModelRunner
    tokenizer: object
    template: ResponseTemplate
    read: Callable              # hidden [N, H] -> value [N] (search/head_stream.py)
    weight: float
    steps: Steps | None = None  # a process reward model's
    pad_id: int | None = None   # a sequence classifier's pad token: read before trailing ones
    special_tokens: bool = True  # a text template's rendering starts with the tokenizer's BOS


def model_head(rm) -> str:
    """The head a (process) reward model is loaded with."""
    if isinstance(rm, RewardModel):
        return "sequence_classification"
    return "causal_lm" if rm.label is not None else "token_classification"


def reward_model_parts(rm, role: str, runner, loaded) -> RewardModelParts:
    """A RewardModel / ProcessRewardModel spec over its loaded model, as the scorer takes it."""
    tok = loaded.tokenizer
    template = ResponseTemplate(rm.template or loaded.template or "{prompt}{response}")
    special = next(s for s in (rm.special_tokens, loaded.special_tokens, True) if s is not None)
    if template.text == "chat":     # refused now, naming the spec, not on every request
        try:
            template.around(tok, "Hi")
        except ValueError as e:
            raise ValueError(f"{type(rm).__name__}.{e}") from None
        change = template.content_change(tok)
        if change is not None:
            log.warning(
                "%s over %s: its chat template changes the assistant's text (it renders "
                "%r as %r) in a way the scorer does not follow (it follows whitespace "
                "stripped at the ends), and scores each response as it is inside the turn: "
                "where a response has what the template would change (a reasoning block, "
                "say), its reward differs from that of apply_chat_template's rendering; pass "
                "a template string to score exactly what it says",
                type(rm).__name__, loaded.spec, *change)

    def one_token(name: str, text: str) -> int:
        ids = encode(tok, text, False)
        if len(ids) != 1:
            raise ValueError(f"ProcessRewardModel.{name}={text!r} is {len(ids)} tokens of the "
                             "model's tokenizer: it must be one")
        return ids[0]
    if isinstance(rm, RewardModel):
        pad = getattr(runner.model.config, "pad_token_id", None)
        return RewardModelParts(role, runner, tok, template, score_head(runner, rm.head_index),
                                rm.weight, pad_id=pad if isinstance(pad, int) else None,
                                special_tokens=special)
    if rm.label is not None:
        read = label_probability(runner, one_token("label", rm.label),
                                 one_token("other_label", rm.other_label)
                                 if rm.other_label is not None else None)
    elif rm.probability:
        read = head_probability(runner, rm.head_index)
    else:
        read = score_head(runner, rm.head_index)
    steps = Steps(rm.step_tag, one_token("step_tag", rm.step_tag), rm.step_separator,
                  rm.aggregate)
    merged = [end for end in STEP_ENDINGS
              if encode(tok, end + rm.step_tag, False)[-1:] != [steps.tag_id]]
    if merged:
        log.warning(
            "ProcessRewardModel over %s: step_tag %r merges with the text before it into "
            "another token (after %s), so a step that ends so has no tag token and is not "
            "read; pick a tag that stays one token wherever it stands (a special token, or "
            "Math-Shepherd's ' ки')", loaded.spec, rm.step_tag,
            ", ".join(repr(end) for end in merged))
    return RewardModelParts(role, runner, tok, template, read, rm.weight, steps,
                            special_tokens=special)
