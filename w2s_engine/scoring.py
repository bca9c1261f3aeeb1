"""What scores a search: the implicit reward of a small pair, a reward model, or a weighted sum.

    Engine(large, tuned, untuned)                                  # ImplicitReward(), the paper's
    Engine(large, scorer=RewardModel("sentiment-rm"))              # an explicit reward model
    Engine(large, tuned, untuned,
           scorer=[ImplicitReward(), RewardModel("path/to/rm", weight=0.5)])

    Engine(large, scorer=ProcessRewardModel("prm", step_tag=" ки", label="+", other_label="-"))

A beam's reward is the weighted sum of its scorers' rewards, each in its own units (none is
rescaled): ImplicitReward's a sum of log-ratios in nats over the response's tokens, growing
with its length; RewardModel's its head's raw logit; ProcessRewardModel's a probability per
step in label mode or with probability=True, else its head's raw output, aggregated. Every
scorer is incremental on its own paged KV (the response goes through each model once per
chunk).
"""

from dataclasses import dataclass


@dataclass
class ImplicitReward:
    """sum_t log pi_tuned(y_t | x, y_<t) - log pi_untuned(y_t | x, y_<t) of the small pair
    passed to Engine(tuned=, untuned=), times `weight`."""

    weight: float = 1.0


@dataclass
class RewardModel:
    """A sequence reward model: a decoder with a classification head (transformers'
    AutoModelForSequenceClassification: Llama, Qwen2, Gemma, Mistral...), read at the last
    token of its own rendering of prompt + response.

    model: a spec (a checkpoint directory, a LoRA adapter directory over a bundled or local
        base, a bundled name such as "sentiment-rm") or a (model, tokenizer) pair.
    template: "...{prompt}...{response}..."; what follows {response} (an end-of-turn token,
        say) is appended for each read and rolled back. "chat": the model's chat template,
        the prompt as the user's turn and the response as the assistant's. None: the one the
        checkpoint names in its w2s_scorer.json, else "{prompt}{response}".
    head_index: which output of the head is the reward (for heads with several), as it is:
        a raw logit, no sigmoid (trl's RewardTrainer trains it so), unbounded: set `weight`
        against the other scorers' scales (scoring.py's docstring).
    special_tokens: whether a text template's rendering is tokenized with the tokenizer's
        special tokens (its BOS), as tokenizer(text) tokenizes it and as reward models are
        trained (trl's RewardTrainer); None: as the checkpoint's w2s_scorer.json says, else
        True. A chat template renders its own.
    """

    model: object
    template: str | None = None
    head_index: int = 0
    weight: float = 1.0
    special_tokens: bool | None = None

    def __post_init__(self):
        check_head_index(type(self).__name__, self.head_index)
        check_special_tokens(type(self).__name__, self.special_tokens)


def check_special_tokens(owner: str, special):
    if special is not None and not isinstance(special, bool):
        raise ValueError(f"{owner}.special_tokens={special!r}: True, False, or None (the "
                         "checkpoint's w2s_scorer.json says, else True)")


def check_head_index(owner: str, index):
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"{owner}.head_index={index!r}: an int >= 0 (which output of the "
                         "model's head is the reward)")


AGGREGATES = ("last", "min", "product", "mean")


@dataclass
class ProcessRewardModel:
    """A process reward model: a score per step of the response, read at a tag token after
    each step, aggregated (last, min, product or mean).

    Steps end at each `step_separator` in the response ("\n\n"), or, with None, at the end of
    each chunk of the search. The rendering is the template's, with `step_tag` inserted
    before each separator (after each chunk) and after the last, unfinished step (appended
    for the read and rolled back, like the template's suffix). The tag must be one token of
    the model's tokenizer (Math-Shepherd's " ки", a special token such as "<extra_0>").
    Each step's score:
    - label mode (`label` given, a causal LM): P(label) at the tag, normalised over {label,
      other_label} when other_label is given (Math-Shepherd: label "+", other_label "-");
    - head mode (label None, a token-classification head): the head's raw output head_index
      (a logit); with probability=True, the probability of class head_index, a softmax over
      the head's outputs (a sigmoid for a head of one output): what a two-class step
      classifier (trl's PRMTrainer, Qwen2.5-Math-PRM, read with head_index=1) means by a
      step's score, and what "product" needs.
    aggregate, as search-and-learn defines its choices (sal/utils/score.py; its default is
    "last", this one's "min", Math-Shepherd's): "last", the last step's score (an unfinished
    last step's, read at the tag after it); "min"; "product" (its "prod"), a product of
    probabilities, refused over raw head outputs; "mean". A separator right after another
    makes an empty step, scored at its tag, as search-and-learn's tagging does.
    special_tokens: as RewardModel's (Math-Shepherd's own example encodes with its BOS).
    """

    model: object
    step_tag: str
    template: str | None = None
    step_separator: str | None = "\n\n"
    label: str | None = None
    other_label: str | None = None
    head_index: int = 0
    aggregate: str = "min"
    weight: float = 1.0
    special_tokens: bool | None = None
    probability: bool = False

    def __post_init__(self):
        if not isinstance(self.step_tag, str) or not self.step_tag:
            raise ValueError(f"ProcessRewardModel.step_tag={self.step_tag!r}: a non-empty string "
                             "(one token of the model's tokenizer)")
        if self.step_separator is not None and (not isinstance(self.step_separator, str)
                                                or not self.step_separator):
            raise ValueError(f"ProcessRewardModel.step_separator={self.step_separator!r}: a "
                             "non-empty string, or None for a step per chunk")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"ProcessRewardModel.aggregate={self.aggregate!r}: one of "
                             f"{', '.join(AGGREGATES)}")
        if self.other_label is not None and self.label is None:
            raise ValueError("ProcessRewardModel.other_label needs label")
        if self.other_label is not None and self.other_label == self.label:
            raise ValueError(f"ProcessRewardModel.other_label={self.other_label!r} is the "
                             "label itself: give the other class's token (Math-Shepherd: "
                             "label '+', other_label '-')")
        if not isinstance(self.probability, bool):
            raise ValueError(f"ProcessRewardModel.probability={self.probability!r}: True or "
                             "False")
        if self.probability and self.label is not None:
            raise ValueError("ProcessRewardModel.probability is for head mode (label None): "
                             "label mode reads a probability already; leave probability out")
        # A product of logits (signed, unbounded) ranks nothing: its sign flips with the
        # number of negative steps.
        if self.aggregate == "product" and self.label is None and not self.probability:
            raise ValueError("ProcessRewardModel.aggregate='product' multiplies step "
                             "probabilities, and head mode reads the head's raw outputs: give "
                             "probability=True (a softmax over the head's outputs), or "
                             "aggregate 'last', 'min' or 'mean'")
        check_head_index(type(self).__name__, self.head_index)
        check_special_tokens(type(self).__name__, self.special_tokens)


SCORERS = (ImplicitReward, RewardModel, ProcessRewardModel)


def scorer_list(scorer, has_pair: bool) -> list:
    """Engine(scorer=...) as a list of specs (raises ValueError saying what to change)."""
    if scorer is None:
        return [ImplicitReward()] if has_pair else []
    specs = list(scorer) if isinstance(scorer, (list, tuple)) else [scorer]
    for s in specs:
        if not isinstance(s, SCORERS):
            raise TypeError(f"scorer={s!r}: pass ImplicitReward(), RewardModel(...), "
                            "ProcessRewardModel(...) or a list of them")
        if not isinstance(s.weight, (int, float)) or isinstance(s.weight, bool) or \
                not abs(s.weight) < float("inf"):
            raise ValueError(f"{type(s).__name__}.weight={s.weight!r}: must be a finite number")
    implicit = [s for s in specs if isinstance(s, ImplicitReward)]
    if len(implicit) > 1:
        raise ValueError("scorer: ImplicitReward appears twice; give it once, with a weight")
    if implicit and not has_pair:
        raise ValueError("scorer: ImplicitReward needs the tuned and untuned small models: "
                         "pass them to Engine(tuned=..., untuned=...)")
    if has_pair and not implicit:
        raise ValueError("tuned and untuned small models were given but the scorer does not "
                         "use them: add ImplicitReward() to scorer, or leave the pair out")
    return specs
