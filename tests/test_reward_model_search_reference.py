"""Searches scored by a reward model or a PRM against from-scratch references written here
with plain transformers forwards (not the engine's code): CBS keeps the top W candidates by
the reference reward at every chunk and Best-of-N returns the reference's argmax, with the
large model's tokenizer and with another; a PRM's steps are tagged and aggregated as
search-and-learn does it (sal/models/reward_models.py, sal/utils/score.py)."""

import math

import pytest
import torch

from test_reward_model import clone_rm
from tiny_models import make_tokenizer, tiny_llama, tiny_reward_model
from w2s_engine import Engine, SearchParams
from w2s_engine.scoring import ProcessRewardModel, RewardModel

PROMPTS = ["I really", "The plot of this film"]
RM_TEMPLATE = "Rate this review. {prompt}{response}"
TAG = "<eos>"   # a special token: one token wherever it stands


@pytest.fixture(scope="module")
def models():
    tok, other = make_tokenizer(300), make_tokenizer(420)
    return {"tok": tok, "other": other,
            "rm": tiny_reward_model(len(tok), seed=7),
            "rm_other": tiny_reward_model(len(other), seed=8),
            "lm": tiny_llama(len(other), seed=9),
            "head": tiny_reward_model(len(other), seed=10, per_token=True)}


@torch.no_grad()
def reference_rm(model, tok, prompt, response) -> float:
    """A sequence reward model as transformers runs it: tok(rendering), BOS first, the
    classification head's raw output 1 at the last token (no pad token set). A response given
    as token ids (the large model's, where it shares the reward model's tokenizer) is read as
    sampled, after the tokenized prompt part (README: "with the large model's tokenizer it
    reads the sampled ids"), not re-tokenized."""
    if isinstance(response, str):
        ids = tok(RM_TEMPLATE.format(prompt=prompt, response=response))["input_ids"]
    else:
        ids = tok(RM_TEMPLATE.format(prompt=prompt, response=""))["input_ids"] + list(response)
    return model(torch.tensor([ids])).logits[0, 1].item()


def response_text(tok, ids, final) -> str:
    """A sampled response's text as the search holds it at a chunk end: its decode, less the
    U+FFFD at its end while it is unfinished (the bytes of a character not complete yet;
    w2s_engine/search/bridge.py holds them back until more tokens come or the beam ends)."""
    text = tok.decode(ids)
    return text if final else text.rstrip("\ufffd")


def rm_engine(models, large_tok, rm):
    rm_tok = models["tok"] if rm == "rm" else models["other"]
    return Engine((tiny_llama(len(models[large_tok]), seed=1, layers=3), models[large_tok]),
                  scorer=RewardModel((clone_rm(models[rm]), rm_tok), template=RM_TEMPLATE,
                                     head_index=1),
                  num_kv_blocks=800, block_size=4, progress=False)


CASES = [("tok", "rm"), ("tok", "rm_other")]


@pytest.mark.parametrize("large_tok, rm", CASES, ids=["shared_tokenizer", "other_tokenizer"])
def test_cbs_with_a_reward_model_keeps_the_top_w_of_a_from_scratch_reward_at_every_chunk(
        models, large_tok, rm):
    engine = rm_engine(models, large_tok, rm)
    rm_tok = models["tok"] if rm == "rm" else models["other"]

    def read(ids, final=True):   # what the reward model reads of a sampled response
        return ids if rm == "rm" else response_text(models[large_tok], ids, final)
    w, k = 2, 3
    params = SearchParams(w=w, k=k, l=3, max_new_tokens=12, temperature=1.2, seed=11, trace=True)
    for res in engine.search(PROMPTS, params):
        survivors, finished = None, {}
        for entry in res.trace:
            cands = entry["candidates"]
            if survivors is not None:    # the children of the last chunk's survivors, K each
                parents = [c["parent_id"] for c in cands if c["beam_id"] not in survivors]
                assert sorted(set(parents)) == sorted(s for s in survivors if not
                                                      finished[s])
                assert all(parents.count(p) == k for p in set(parents))
            ref = [reference_rm(models[rm], rm_tok, res.prompt,
                                read(c["token_ids"], c["finished"]
                                     or c["num_tokens"] >= params.max_new_tokens))
                   for c in cands]
            for c, r in zip(cands, ref):
                assert c["reward"] == pytest.approx(r, abs=1e-4)
            order = sorted(range(len(cands)), key=lambda i: (-ref[i], i))[:w]
            assert entry["survivors"] == [cands[i]["beam_id"] for i in order]
            survivors = entry["survivors"]
            finished = {c["beam_id"]: c["finished"] for c in cands}
        best = max(res.hypotheses, key=lambda h: h.reward)
        assert res.text == best.text and res.reward == pytest.approx(
            reference_rm(models[rm], rm_tok, res.prompt, read(best.token_ids)), abs=1e-4)
    engine.check_all_free()


@pytest.mark.parametrize("large_tok, rm", CASES, ids=["shared_tokenizer", "other_tokenizer"])
def test_best_of_n_with_a_reward_model_returns_the_argmax_of_a_from_scratch_reward(
        models, large_tok, rm):
    engine = rm_engine(models, large_tok, rm)
    rm_tok = models["tok"] if rm == "rm" else models["other"]
    n = 5
    res = engine.search(["What a"], SearchParams.best_of_n(n, max_new_tokens=10, seed=4,
                                                           temperature=1.2, trace=True))[0]
    cands = res.trace[0]["candidates"]
    assert len(res.trace) == 1 and len(cands) == n
    ref = [reference_rm(models[rm], rm_tok, "What a", c["token_ids"] if rm == "rm"
                        else models[large_tok].decode(c["token_ids"])) for c in cands]
    assert len({round(r, 4) for r in ref}) == n, "the samples should score apart"
    assert res.reward == pytest.approx(max(ref), abs=1e-4)
    assert res.token_ids == cands[ref.index(max(ref))]["token_ids"]
    engine.check_all_free()


def sal_aggregate(scores, how):
    """search-and-learn's aggregate_scores (sal/utils/score.py), "prod" spelled "product"."""
    return {"min": min, "product": math.prod, "last": lambda s: s[-1],
            "mean": lambda s: sum(s) / len(s)}[how](scores)


def sal_tagged(text, sep):
    """search-and-learn's Math-Shepherd rendering of a response: the tag before each
    separator, and after the text where it does not end with one (an empty one included)."""
    out = text.replace(sep, TAG + sep)
    return out if out.endswith(sep) else out + TAG


RESPONSES = ["", " liked it", " liked it\n\nthe plot", " liked it\n\nthe plot\n\n",
             "\n\n the\n\n\n\nend"]


@torch.no_grad()
@pytest.mark.parametrize("how", ["last", "min", "product", "mean"])
def test_label_mode_prm_scores_steps_as_search_and_learn_does_for_math_shepherd(models, how):
    tok = models["other"]
    prm = ProcessRewardModel((clone_rm(models["lm"]), tok), step_tag=TAG, template=RM_TEMPLATE,
                             label="+", other_label="-", aggregate=how)
    engine = Engine((tiny_llama(len(models["tok"]), seed=1, layers=3), models["tok"]),
                    scorer=prm, num_kv_blocks=800, block_size=4, progress=False)
    plus, minus = (tok(c, add_special_tokens=False)["input_ids"][0] for c in "+-")
    tag_id = tok.convert_tokens_to_ids(TAG)
    got = engine.score(["I really"] * len(RESPONSES), RESPONSES)
    for text, value in zip(RESPONSES, got):
        ids = tok(RM_TEMPLATE.format(prompt="I really", response=sal_tagged(text, "\n\n")))[
            "input_ids"]
        logits = models["lm"](torch.tensor([ids])).logits[0][:, [plus, minus]]
        scores = logits.softmax(-1)[:, 0][torch.tensor(ids) == tag_id].tolist()
        assert len(scores) == max(1, text.count("\n\n") + (not text.endswith("\n\n")))
        assert value == pytest.approx(sal_aggregate(scores, how), abs=1e-5)
    engine.check_all_free()


@torch.no_grad()
def test_head_mode_probability_reads_the_softmax_of_a_step_classifier_as_qwen_prm_does(models):
    # A two-class step classifier (trl's PRMTrainer, Qwen2.5-Math-PRM): a step's score is
    # P(class 1), a softmax over the head's outputs at the tag (sal's make_step_rewards),
    # the product of those over the steps.
    tok = models["other"]
    prm = ProcessRewardModel((clone_rm(models["head"]), tok), step_tag=TAG, template=RM_TEMPLATE,
                             head_index=1, probability=True, aggregate="product")
    engine = Engine((tiny_llama(len(models["tok"]), seed=1, layers=3), models["tok"]),
                    scorer=prm, num_kv_blocks=800, block_size=4, progress=False)
    tag_id = tok.convert_tokens_to_ids(TAG)
    got = engine.score(["I really"] * len(RESPONSES), RESPONSES)
    for text, value in zip(RESPONSES, got):
        ids = tok(RM_TEMPLATE.format(prompt="I really", response=sal_tagged(text, "\n\n")))[
            "input_ids"]
        probs = models["head"](torch.tensor([ids])).logits[0].softmax(-1)[:, 1]
        scores = probs[torch.tensor(ids) == tag_id].tolist()
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(math.prod(scores), abs=1e-5)
    engine.check_all_free()


def test_a_product_of_raw_head_outputs_is_refused_saying_to_read_probabilities():
    # A product of logits ranks nothing (its sign flips with the number of negative steps).
    with pytest.raises(ValueError, match="probability=True"):
        ProcessRewardModel("m", step_tag="x", aggregate="product")
    with pytest.raises(ValueError, match="label mode reads a probability already"):
        ProcessRewardModel("m", step_tag="x", label="+", probability=True)
    ProcessRewardModel("m", step_tag="x", aggregate="product", probability=True)
    ProcessRewardModel("m", step_tag="x", aggregate="product", label="+")
