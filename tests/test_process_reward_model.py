"""A process reward model as the search's scorer: a score at the tag after each step (steps
end at a separator, or at each chunk), aggregated; equal to a full forward of the tagged
rendering, in label mode (P(label) from the LM head) and head mode (a token classifier)."""

import math
import re

import pytest
import torch

from tiny_models import clone, make_tokenizer, tiny_llama, tiny_reward_model
from w2s_engine import Engine, SearchParams
from w2s_engine.scoring import ProcessRewardModel, RewardModel
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
    tagged, unfinished, offsets = tag_steps(text, TAG, separator, marks)
    prompt_ids = tok(before)["input_ids"]              # its BOS first, as tok(text) adds it
    enc = tok(before + tagged, return_offsets_mapping=True)
    ids = enc["input_ids"]
    start = common_prefix(ids, prompt_ids)
    tag_id = tok(TAG, add_special_tokens=False)["input_ids"][0]
    inserted = {len(before) + o for o in offsets}   # not the tag's text in the response
    reads = [i for i in range(start, len(ids))
             if ids[i] == tag_id and enc["offset_mapping"][i][0] in inserted]
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
        assert res.small_token_ids == []   # a PRM's tokens have step tags: no response's
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


def test_a_stop_string_across_a_chunk_end_leaves_the_cut_text_s_last_step_scored(models):
    # Steps end at each chunk (l=1: each token); a stop string that starts in chunk 3 and ends
    # in chunk 4 cuts the text before the third chunk end: the text's last step is the cut
    # tail, read at the tag after it, as a full forward of the returned text reads it.
    tok = models["tok"]
    words = [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" the", " and", " was")]
    params = SearchParams(w=1, k=1, l=1, max_new_tokens=6, temperature=1.0,
                          logit_bias={w: 100.0 for w in words})
    engine = engine_with(models, models["head"], step_separator=None, head_index=1,
                         aggregate="last")
    for seed in range(20):
        whole = engine.search(["I really"], params.copy(seed=seed))[0]
        ends = [len(tok.decode(whole.token_ids[:i])) for i in range(1, 7)]
        stop = whole.text[ends[2] - 2:ends[2] + 2]
        if whole.text.find(stop) == ends[2] - 2:     # its first match straddles that end
            break
    cut = engine.search(["I really"], params.copy(seed=seed, stop=[stop]))[0]
    assert cut.text == whole.text[:ends[2] - 2] and cut.finish_reason == "stop"
    marks = [m for m in ends[:3] if m <= len(cut.text)]
    want = scratch_prm(models, models["head"], "I really", cut.text, marks, None, False, "last")
    assert cut.reward == pytest.approx(want, abs=1e-4)
    engine.check_all_free()


@pytest.mark.parametrize("separator", ["\n\n", None])
def test_an_empty_response_is_one_step_the_prm_reads_after_the_prompt_not_a_zero(models,
                                                                                 separator):
    """A candidate that wrote nothing (EOS first) is scored by the PRM at the tag right after
    the prompt, as search-and-learn scores an empty completion: with a head's scores a made-up
    0.0 could beat every candidate that wrote something."""
    engine = engine_with(models, models["head"], step_separator=separator, head_index=1,
                         aggregate="min")
    got = engine.score(["Q:"], [""])[0]
    want = scratch_prm(models, models["head"], "Q:", "", [], separator, False, "min")
    assert got == pytest.approx(want, abs=1e-4) and abs(got) > 1e-3
    engine.check_all_free()


def test_score_of_token_ids_with_a_process_reward_model_asks_for_the_text(models):
    engine = engine_with(models, models["head"], step_separator=None, head_index=1)
    with pytest.raises(ValueError, match="process reward model reads the response's text"):
        engine.score(["I really"], [[5, 6, 7]])
    engine.check_all_free()


@torch.no_grad()
def test_the_step_tag_written_in_a_response_is_text_not_a_step(models):
    engine = engine_with(models, models["head"], step_separator="\n\n", head_index=1,
                         aggregate="mean")
    first = f"one step {TAG} still the same step"
    got = engine.score(["Q:"], [first + "\n\nand a second"])[0]
    # By hand: two steps, read at the tag inserted before the separator and at the one
    # appended after the unfinished second step; the tag in the text is read by no one.
    tok, head = models["other"], models["head"]
    before = TEMPLATE.split("{response}")[0].replace("{prompt}", "Q:")
    enc = tok(before + first + TAG + "\n\nand a second", return_offsets_mapping=True)
    ids = enc["input_ids"] + [tok.convert_tokens_to_ids(TAG)]
    inserted = [i for i, (a, _) in enumerate(enc["offset_mapping"])
                if a == len(before) + len(first)]
    assert len(inserted) == 1
    out = head(torch.tensor([ids])).logits[0]
    want = (out[inserted[0], 1].item() + out[len(ids) - 1, 1].item()) / 2
    assert got == pytest.approx(want, abs=1e-4)
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
    assert tag_steps("a\n\nb", "<t>", "\n\n", []) == ("a<t>\n\nb", True, [1])
    assert tag_steps("a\n\n", "<t>", "\n\n", []) == ("a<t>\n\n", False, [1])
    assert tag_steps("abcdef", "<t>", None, [2, 4]) == ("ab<t>cd<t>ef", True, [2, 7])
    assert tag_steps("abcd", "<t>", None, [2, 4]) == ("ab<t>cd<t>", False, [2, 7])
    # A tag written in the response is text, not a step's end.
    assert tag_steps("x<t>y\n\nz", "<t>", "\n\n", []) == ("x<t>y<t>\n\nz", True, [5])
    # A stop string cut the text before a chunk end: no step ends past the cut.
    assert tag_steps("abcde", "<t>", None, [2, 4, 6]) == ("ab<t>cd<t>e", True, [2, 7])
    # An empty response is one empty, unfinished step (read at the tag after the prompt).
    assert tag_steps("", "<t>", "\n\n", []) == tag_steps("", "<t>", None, []) == ("", True, [])
    values = [0.5, 0.25, 1.0]
    assert [aggregate(values, h) for h in ("last", "min", "product", "mean")] == \
        [1.0, 0.25, 0.125, pytest.approx(0.5833333)]
    assert aggregate([], "min") == 0.0


@pytest.mark.parametrize("make, says", [
    (lambda: RewardModel("m", head_index=True), "RewardModel.head_index=True"),
    (lambda: RewardModel("m", head_index="1"), "RewardModel.head_index='1'"),
    (lambda: ProcessRewardModel("m", step_tag="x", head_index=-1), "head_index=-1"),
    (lambda: ProcessRewardModel("m", step_tag="x", label="+", other_label="+"),
     "is the label itself"),
])
def test_a_reward_model_spec_that_cannot_score_is_refused_when_made(make, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        make()


def test_label_mode_over_a_model_without_an_lm_head_is_refused_at_start(models):
    prm = ProcessRewardModel((clone_head(models["head"]), models["other"]), step_tag=TAG,
                             template=TEMPLATE, label="+", other_label="-")
    with pytest.raises(ValueError, match="has none .a classification head"):
        Engine((tiny_llama(len(models["tok"]), seed=1, layers=3), models["tok"]), scorer=prm,
               num_kv_blocks=800, block_size=4, progress=False)


def test_a_step_tag_that_merges_with_the_text_before_it_is_named_at_load(models, caplog):
    """A finished step's tag goes into the text; where it merges with the step's last
    characters ('th' + 'e' -> 'the') no tag token stands there and that step is not read:
    said at load, with the endings it merges after."""
    import logging
    for tag, merges in (("e", True), (TAG, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="w2s_engine"):
            Engine((tiny_llama(300, seed=1), models["tok"]),
                   scorer=ProcessRewardModel((clone(models["lm"]), models["other"]),
                                             step_tag=tag, label="+", template=TEMPLATE),
                   num_kv_blocks=50, progress=False)
        said = [r.getMessage() for r in caplog.records if "merges with the text" in
                r.getMessage()]
        assert bool(said) == merges
        if merges:
            assert "step_tag 'e'" in said[0] and "'th'" in said[0]
