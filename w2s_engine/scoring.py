"""What scores a search: the implicit reward of a small pair, a reward model, or a weighted sum.

    Engine(large, tuned, untuned)                                  # ImplicitReward(), the paper's
    Engine(large, scorer=RewardModel("sentiment-rm"))              # an explicit reward model
    Engine(large, tuned, untuned,
           scorer=[ImplicitReward(), RewardModel("path/to/rm", weight=0.5)])

A beam's reward is the weighted sum of its scorers' rewards; every scorer is incremental on
its own paged KV (the response goes through each model once per chunk).
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
    head_index: which output of the head is the reward (for heads with several).
    """

    model: object
    template: str | None = None
    head_index: int = 0
    weight: float = 1.0


SCORERS = (ImplicitReward, RewardModel)


def scorer_list(scorer, has_pair: bool) -> list:
    """Engine(scorer=...) as a list of specs (raises ValueError saying what to change)."""
    if scorer is None:
        return [ImplicitReward()] if has_pair else []
    specs = list(scorer) if isinstance(scorer, (list, tuple)) else [scorer]
    for s in specs:
        if not isinstance(s, SCORERS):
            raise TypeError(f"scorer={s!r}: pass ImplicitReward(), RewardModel(...) or a list "
                            "of them")
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
