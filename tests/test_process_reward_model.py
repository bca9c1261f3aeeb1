"""A process reward model as the search's scorer: a score at the tag after each step (steps
end at a separator, or at each chunk), aggregated; equal to a full forward of the tagged
rendering, in label mode (P(label) from the LM head) and head mode (a token classifier)."""

import math

import pytest
import torch

from tiny_models import clone, make_tokenizer, tiny_llama, tiny_reward_model
from w2s_engine import Engine, SearchParams
from w2s_engine.scoring import ProcessRewardModel
from w2s_engine.search.bridge import DetokState, Detokenizer
from w2s_engine.search.steps import aggregate, tag_steps
from w2s_engine.search.tokens import common_prefix

PROMPTS = ["I really", "The plot of this film"]
TEMPLATE = "Check each step. {prompt}{response}"
TAG = "<eos>"   # a special token: one token wherever it stands


@pytest.fixture(scope="module")
def models():
    tok, other = make_tokenizer(300), make_tokenizer(420)
    return {"tok": tok, "other": other,
            "lm": tiny_llama(len(other), seed=9), "head": tiny_reward_model(len(other), seed=10,
                                                                           per_token=True)}


def engine_with(models, prm_model, **spec):
    tok = models["tok"]
    prm = ProcessRewardModel((clone(prm_model) if "label" in spec else clone_head(prm_model),
                              models["other"]), step_tag=TAG, template=TEMPLATE, **spec)
    return Engine((tiny_llama(len(tok), seed=1, layers=3), tok), scorer=prm,
                  num_kv_blocks=800, block_size=4, progress=False)


def clone_head(model):
    import copy
    twin = type(model)(copy.deepcopy(model.config)).eval()
    twin.load_state_dict(model.state_dict())
    return twin


@torch.no_grad()
def scratch_prm(models, model, prompt, text, marks, separator, label_mode, how) -> float:
    """Full forward of the tagged rendering; the step scores at every tag; aggregated."""
    tok = models["other"]
    before = TEMPLATE.split("{response}")[0].replace("{prompt}", prompt)
    tagged, unfinished = tag_steps(text, TAG, separator, marks)
    prompt_ids = tok(before, add_special_tokens=False)["input_ids"]
    ids = tok(before + tagged, add_special_tokens=False)["input_ids"]
    start = common_prefix(ids, prompt_ids)
    tag_id = tok(TAG, add_special_tokens=False)["input_ids"][0]
    reads = [i for i in range(start, len(ids)) if ids[i] == tag_id]
    if unfinished:
        reads.append(len(ids))
        ids = ids + [tag_id]
    out = model(torch.tensor([ids])).logits[0]
    if label_mode:
        plus, minus = (tok(c, add_special_tokens=False)["input_ids"][0] for c in "+-")
        values = [out[p, [plus, minus]].softmax(-1)[0].item() for p in reads]
    else:
        values = [out[p, 1].item() for p in reads]
    return aggregate(values, how)


# The tiny random large model samples raw bytes: its text is mostly U+FFFD (an incomplete
# character), the most frequent separator there is for these tests.
SEPARATOR = "\ufffd"


def test_label_mode_with_a_separator_scores_every_step_like_a_full_forward(models):
    engine = engine_with(models, models["lm"], label="+", other_label="-",
                         step_separator=SEPARATOR, aggregate="last")
    params = SearchParams(w=2, k=3, l=3, max_new_tokens=15, temperature=1.0, seed=4, trace=True)
    steps = unfinished = 0
    for res in engine.search(PROMPTS, params):
        for h in res.hypotheses:
            want = scratch_prm(models, models["lm"], res.prompt, h.text, [], SEPARATOR, True,
                               "last")
            assert h.reward == pytest.approx(want, abs=1e-4)
            assert 0.0 <= h.reward <= 1.0
            steps += h.text.count(SEPARATOR)
            unfinished += not h.text.endswith(SEPARATOR)
        assert res.reward == pytest.approx(
            engine.score([res.prompt], [res.text])[0], abs=1e-4)
    assert steps >= 3, "the workload should end several steps at the separator"
    assert unfinished, "and leave a last step unfinished (read at the tag after it)"
    engine.check_all_free()


def test_head_mode_with_a_step_per_chunk_scores_every_chunk_end(models):
    how = "mean"
    engine = engine_with(models, models["head"], step_separator=None, head_index=1, aggregate=how)
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=12, temperature=1.0, seed=6, trace=True)
    detok = Detokenizer(models["tok"])
    for res in engine.search(PROMPTS, params):
        # Each candidate's text at every chunk end along its lineage: its step ends.
        lineage = {}
        for entry in res.trace:
            for c in entry["candidates"]:
                if c["beam_id"] in lineage:
                    continue
                state, parent_marks = lineage.get(c["parent_id"], (DetokState(), []))
                state = state.copy()
                text = detok.update(state, c["token_ids"], flush=c["finished"])
                want = scratch_prm(models, models["head"], res.prompt, text, parent_marks, None,
                                   False, how)
                assert c["reward"] == pytest.approx(want, abs=1e-4)
                lineage[c["beam_id"]] = (state, parent_marks + (
                    [len(text)] if len(text) > (parent_marks[-1] if parent_marks else 0) else []))
        assert math.isfinite(res.reward)
    engine.check_all_free()


def test_a_step_tag_or_label_that_is_not_one_token_is_refused(models):
    with pytest.raises(ValueError, match="step_tag=.* must be one"):
        Engine((tiny_llama(300, seed=1), models["tok"]),
               scorer=ProcessRewardModel((clone(models["lm"]), models["other"]),
                                         step_tag="two words here", label="+"),
               num_kv_blocks=50, progress=False)
    with pytest.raises(ValueError, match="aggregate"):
        ProcessRewardModel("m", step_tag="x", aggregate="median")


def test_aggregates_and_tags():
    assert tag_steps("a\n\nb", "<t>", "\n\n", []) == ("a<t>\n\nb", True)
    assert tag_steps("a\n\n", "<t>", "\n\n", []) == ("a<t>\n\n", False)
    assert tag_steps("abcdef", "<t>", None, [2, 4]) == ("ab<t>cd<t>ef", True)
    assert tag_steps("abcd", "<t>", None, [2, 4]) == ("ab<t>cd<t>", False)
    values = [0.5, 0.25, 1.0]
    assert [aggregate(values, h) for h in ("last", "min", "product", "mean")] == \
        [1.0, 0.25, 0.125, pytest.approx(0.5833333)]
    assert aggregate([], "min") == 0.0
