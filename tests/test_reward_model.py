"""A reward model as the search's scorer: incremental on its own paged KV, equal to a full
forward of its rendering of prompt + response, alone or in a weighted sum with the implicit
reward, with the large model's tokenizer or another."""

import copy

import pytest
import torch

from tiny_models import clone, make_tokenizer, tiny_llama, tiny_reward_model, tuned_from
from w2s_engine import Engine, SearchParams
from w2s_engine.models.loader import ModelLoadError
from w2s_engine.scoring import ImplicitReward, RewardModel
from w2s_engine.search.tokens import common_prefix

PROMPTS = ["I really", "This film", "The plot of this film"]
LARGE_TEMPLATE = "Here is a movie review: {prompt}"
SMALL_TEMPLATE = "Review: {prompt}"
RM_TEMPLATE = "Rate this review. {prompt}{response}<eos>"   # <eos>: the suffix, read each time


@pytest.fixture(scope="module")
def models():
    tok, other = make_tokenizer(300), make_tokenizer(420)
    untuned = tiny_llama(len(tok), seed=2)
    return {"tok": tok, "other": other, "untuned": untuned,
            "tuned": tuned_from(untuned, seed=3, scale=0.3),
            "rm": tiny_reward_model(len(tok), seed=7), "rm_other": tiny_reward_model(len(other), seed=8)}


def make_engine(models, large_tok="tok", rm="rm", pair=False, weight=1.0, **kw):
    large_tok = models[large_tok]
    rm_tok = models["tok"] if rm == "rm" else models["other"]
    scorer = [RewardModel((clone_rm(models[rm]), rm_tok), template=RM_TEMPLATE, head_index=1,
                          weight=weight)]
    extra = {}
    if pair:
        scorer = [ImplicitReward()] + scorer
        extra = dict(tuned=(clone(models["tuned"]), models["tok"]),
                     untuned=(clone(models["untuned"]), models["tok"]))
    kw.setdefault("num_kv_blocks", 800)
    return Engine((tiny_llama(len(large_tok), seed=1, layers=3), large_tok), scorer=scorer,
                  templates={"large": LARGE_TEMPLATE, "small": SMALL_TEMPLATE}, block_size=4,
                  progress=False, **extra, **kw)


def clone_rm(model):
    twin = type(model)(copy.deepcopy(model.config)).eval()
    twin.load_state_dict(model.state_dict())
    return twin


@torch.no_grad()
def scratch_rm(model, tok, prompt, response) -> float:
    """The reward model's head at the last token of its rendering, in one full forward: the
    rendering as tok(text) tokenizes it, its BOS first (RewardModel.special_tokens)."""
    before, after = RM_TEMPLATE.split("{response}")
    before = before.replace("{prompt}", prompt)
    if isinstance(response, str):
        ids = tok(before + response)["input_ids"]
    else:
        ids = tok(before)["input_ids"] + list(response)
    ids = ids + tok(after, add_special_tokens=False)["input_ids"]
    return model(torch.tensor([ids])).logits[0, 1].item()


@torch.no_grad()
def scratch_implicit(models, prompt, response_ids, finished) -> float:
    tok = models["tok"]
    full = tok(SMALL_TEMPLATE.replace("{prompt}", prompt), add_special_tokens=False)["input_ids"]
    start = len(full)
    full = full + list(response_ids) + ([tok.eos_token_id] if finished else [])
    total = 0.0
    for model, sign in ((models["tuned"], 1.0), (models["untuned"], -1.0)):
        logp = model(torch.tensor([full])).logits[0].log_softmax(-1)
        total += sign * sum(logp[i - 1, full[i]].item() for i in range(start, len(full)))
    return total


def scored(tok, token_ids, stop="e"):
    """What the reward model reads of a sampled response: its tokens, or where the stop
    string ended it, the text before the stop string (the response returned)."""
    text = tok.decode(token_ids)
    return text[:text.index(stop)] if stop in text else token_ids


def test_every_hypothesis_reward_equals_a_full_forward_of_the_reward_model(models):
    engine = make_engine(models)
    finished = cut = 0
    for l, seed in [(3, 1), (4, 2)]:
        params = SearchParams(w=2, k=3, l=l, max_new_tokens=14, temperature=1.2, seed=seed,
                              stop=["e"], trace=True)
        for res in engine.search(PROMPTS, params):
            for h in res.hypotheses:
                want = scratch_rm(models["rm"], models["tok"], res.prompt,
                                  scored(models["tok"], h.token_ids))
                assert h.reward == pytest.approx(want, abs=1e-4)
                finished += h.finished
                cut += not h.finished
                if "e" not in models["tok"].decode(h.token_ids):
                    assert h.small_token_ids == h.token_ids   # the suffix is not the response's
            # Every candidate of every chunk too, not only the survivors.
            for entry in res.trace:
                for c in entry["candidates"]:
                    assert c["reward"] == pytest.approx(scratch_rm(
                        models["rm"], models["tok"], res.prompt,
                        scored(models["tok"], c["token_ids"])), abs=1e-4)
    assert finished and cut, "the workload should have finished and cut hypotheses"
    engine.check_all_free()


def test_a_reward_model_whose_template_ends_with_its_pad_token_is_read_where_transformers_pools(
        models):
    # pad == eos, as many reward models set it, and a template that ends with that token:
    # transformers' *ForSequenceClassification reads the last token that is not the pad.
    tok = models["tok"]
    padded = clone_rm(models["rm"])
    padded.config.pad_token_id = tok.eos_token_id
    assert RM_TEMPLATE.endswith("<eos>") and tok.convert_tokens_to_ids("<eos>") == tok.eos_token_id
    engine = Engine((tiny_llama(len(tok), seed=1, layers=3), tok),
                    scorer=RewardModel((clone_rm(padded), tok), template=RM_TEMPLATE, head_index=1),
                    templates={"large": LARGE_TEMPLATE}, num_kv_blocks=800, block_size=4,
                    progress=False)
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=9, temperature=1.0, seed=5)
    for res in engine.search(PROMPTS[:2], params):
        for h in res.hypotheses:
            want = scratch_rm(padded, tok, res.prompt, h.token_ids)
            assert want != pytest.approx(scratch_rm(models["rm"], tok, res.prompt, h.token_ids))
            assert h.reward == pytest.approx(want, abs=1e-4)
            assert engine.score([res.prompt], [h.token_ids])[0] == pytest.approx(want, abs=1e-4)
    engine.check_all_free()


def test_score_takes_token_ids_only_where_every_scorer_reads_them_as_the_same_tokens(models):
    ids = models["tok"](" liked this movie", add_special_tokens=False)["input_ids"]
    one = make_engine(models, pair=True)                  # the pair and the RM share a tokenizer
    assert one.score(["I really"], [ids]) == pytest.approx(
        one.score(["I really"], [" liked this movie"]), abs=1e-4)
    two = make_engine(models, rm="rm_other", pair=True)   # the RM has another tokenizer
    with pytest.raises(ValueError, match="different tokenizers.*pass the response as a text"):
        two.score(["I really"], [ids])
    two.check_all_free()


def test_a_reward_model_with_another_tokenizer_scores_the_response_text(models):
    engine = make_engine(models, large_tok="tok", rm="rm_other")
    params = SearchParams(w=2, k=2, l=2, max_new_tokens=12, temperature=1.0, seed=3)
    for res in engine.search(PROMPTS, params):
        for h in res.hypotheses:
            want = scratch_rm(models["rm_other"], models["other"], res.prompt, h.text)
            assert h.reward == pytest.approx(want, abs=1e-4)
            assert h.reward == pytest.approx(engine.score([res.prompt], [h.text])[0], abs=1e-4)
    engine.check_all_free()


def test_a_weighted_sum_adds_the_implicit_reward_and_the_reward_model(models):
    engine = make_engine(models, pair=True, weight=0.5)
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=10, temperature=1.0, seed=5)
    for res in engine.search(PROMPTS[:2], params):
        for h in res.hypotheses:
            want = (scratch_implicit(models, res.prompt, h.token_ids, h.finished)
                    + 0.5 * scratch_rm(models["rm"], models["tok"], res.prompt, h.token_ids))
            assert h.reward == pytest.approx(want, abs=1e-4)
            assert h.reward == pytest.approx(
                engine.score([res.prompt], [h.token_ids], finished=h.finished)[0], abs=1e-4)
        assert {"tuned", "untuned", "reward_model"} <= set(res.stats.tokens_forwarded)
    engine.check_all_free()


def test_the_reward_model_forwards_the_prompt_once_and_each_chunk_with_its_suffix(models):
    engine = make_engine(models)
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=9, seed=8, trace=True)
    res = engine.search(["I really"], params)[0]
    tok = models["tok"]
    prompt_len = len(tok("Rate this review. I really")["input_ids"])   # its BOS first
    suffix_len = len(tok("<eos>", add_special_tokens=False)["input_ids"])
    lengths, expected = {}, prompt_len
    for entry in res.trace:
        for c in entry["candidates"]:
            if c["beam_id"] in lengths:
                continue  # a finished survivor carried over: not scored again
            new = c["num_tokens"] - lengths.get(c["parent_id"], 0)
            expected += new + suffix_len if new else 0
            lengths[c["beam_id"]] = c["num_tokens"]
    assert res.stats.tokens_forwarded["reward_model"] == expected


def test_best_of_n_with_a_reward_model_returns_its_best_sample(models):
    engine = make_engine(models)
    res = engine.search(["What a"], SearchParams.best_of_n(6, max_new_tokens=8, seed=2,
                                                           trace=True))[0]
    cands = res.trace[0]["candidates"]
    assert res.reward == max(c["reward"] for c in cands)
    engine.check_all_free()


def test_eft_needs_the_implicit_reward_alone_and_a_request_failing_mid_way_frees_its_blocks(
        models):
    engine = make_engine(models, large_tok="other", rm="rm")   # the bridge from the large model
    with pytest.raises(ValueError, match="implicit reward alone"):
        engine.search(["I really"], SearchParams.eft(max_new_tokens=4))
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=6, seed=1)
    good = engine.add_request("I really", params)
    bad = engine.make_request("This film", params)
    bad.small_prompts[0].tokenizer = None  # its re-tokenization at the first chunk will raise
    engine.enqueue(bad)
    while engine.has_unfinished():
        engine.step()
    assert good.status == "done" and bad.status == "failed"
    engine.check_all_free()


def test_scorer_choices_that_cannot_work_say_what_to_change(models):
    tok = models["tok"]
    large = (tiny_llama(len(tok), seed=1), tok)
    with pytest.raises(ValueError, match="ImplicitReward needs the tuned and untuned"):
        Engine(large, scorer=ImplicitReward(), num_kv_blocks=50, progress=False)
    with pytest.raises(ValueError, match="does not use them"):
        Engine(large, (clone(models["tuned"]), tok), (clone(models["untuned"]), tok),
               scorer=RewardModel((clone_rm(models["rm"]), tok)), num_kv_blocks=50,
               progress=False)
    with pytest.raises(TypeError, match="RewardModel"):
        Engine(large, scorer="a reward model", num_kv_blocks=50, progress=False)
    with pytest.raises(ValueError, match="template"):
        Engine(large, scorer=RewardModel((clone_rm(models["rm"]), tok), template="{response}"),
               num_kv_blocks=50, progress=False)
    # 'chat' over a tokenizer without a chat template: refused at load, naming the spec.
    with pytest.raises(ValueError, match=r"RewardModel.template='chat', but .* no chat template"):
        Engine(large, scorer=RewardModel((clone_rm(models["rm"]), tok), template="chat"),
               num_kv_blocks=50, progress=False)
    assert common_prefix([1, 2], [1, 3]) == 1


def scorer_runners(engine):
    """Every small model's runner: the implicit pair's and the reward model's."""
    return [r for s in engine.scorer.streams
            for r in (s.runners.values() if hasattr(s, "runners") else [s.runner])]


def fail_forwards(monkeypatch, engine, fails):
    """Each scorer runner's run() forwards for real (writing the cache), then raises when
    fails(requests whose small tables are in the batch) says so."""
    def owners(items):
        live = engine.scheduler.running
        tables = {id(st.table): r for r in live for b in [*r.beams, r.root] if b is not None
                  for st in b.small}
        return {id(tables[id(t)]): tables[id(t)] for t, _ in items if id(t) in tables}

    for runner in scorer_runners(engine):
        def run(items, *rest, real=runner.run):
            out = real(items, *rest)
            if fails(list(owners(items).values())):
                raise RuntimeError("CUDA out of memory")
            return out
        monkeypatch.setattr(runner, "run", run)


@pytest.mark.parametrize("large_tok, rm", [("tok", "rm"), ("other", "rm_other")],
                         ids=["shared-vocab", "cross-vocab"])
def test_a_scoring_batch_that_fails_after_writing_the_cache_is_scored_per_request_to_the_same_rewards(
        models, monkeypatch, large_tok, rm):
    engine = make_engine(models, large_tok=large_tok, rm=rm, pair=True)
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=10, seed=5)
    alone = [engine.search([p], params)[0] for p in PROMPTS]
    fail_forwards(monkeypatch, engine, lambda owners: len(owners) > 1)
    together = engine.search(PROMPTS, params)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.reward for r in together] == pytest.approx([r.reward for r in alone], abs=1e-5)
    # the same work: each prompt's tokens forwarded, or read from the prefix cache (the alone
    # runs' prompts, and their template's beginning, are cached for the runs after them)
    def work(results):
        return [{role: n + r.stats.cached_prompt_tokens.get(role, 0)
                 for role, n in r.stats.tokens_forwarded.items()} for r in results]
    assert work(together) == work(alone)
    engine.check_all_free()


def test_a_scoring_forward_that_fails_for_one_request_fails_it_alone(models, monkeypatch):
    from w2s_engine.search.request import RequestStatus
    engine = make_engine(models, large_tok="other", rm="rm_other", pair=True)
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=10, seed=5)
    alone = [engine.search([p], params)[0] for p in PROMPTS[::2]]
    fail_forwards(monkeypatch, engine, lambda owners: any(r.prompt == "POISON" for r in owners)
                  and any(r.prefilled for r in owners if r.prompt == "POISON" and r.beams))
    reqs = [engine.add_request(p, params) for p in (PROMPTS[0], "POISON", PROMPTS[2])]
    while engine.has_unfinished():
        engine.step()
    assert [r.status for r in reqs] == [RequestStatus.DONE, RequestStatus.FAILED,
                                        RequestStatus.DONE]
    assert "engine error in scoring: RuntimeError" in reqs[1].error
    assert [reqs[0].result.token_ids, reqs[2].result.token_ids] == [r.token_ids for r in alone]
    assert [reqs[0].result.reward, reqs[2].result.reward] == pytest.approx(
        [r.reward for r in alone], abs=1e-5)
    engine.check_all_free()


def test_a_reward_model_scores_on_the_static_path_with_the_same_rewards(models, monkeypatch):
    """cuda_graphs=True (run eagerly on a CPU): the reward model's and the small pair's
    uniform scoring forwards take the static path, and every reward is the full forward's."""
    engine = make_engine(models, pair=True, cuda_graphs=True)
    runner = engine.runners["reward_model"]
    assert runner.scoring_graphs is not None
    shapes = []
    run = runner.scoring_graphs.run
    monkeypatch.setattr(runner.scoring_graphs, "run",
                        lambda seqs, shape, *rest: shapes.append(shape) or run(seqs, shape, *rest))
    params = SearchParams(w=2, k=3, l=4, max_new_tokens=12, temperature=1.0, seed=4,
                          ignore_eos=True)
    for res in engine.search(PROMPTS, params):
        for h in res.hypotheses:
            want = (scratch_rm(models["rm"], models["tok"], res.prompt, h.token_ids)
                    + scratch_implicit(models, res.prompt, h.token_ids, h.finished))
            assert h.reward == pytest.approx(want, abs=1e-4)
    assert shapes, "the reward model never scored on the static path"
    engine.check_all_free()


def test_a_reward_model_whose_checkpoint_has_no_head_is_refused_and_one_with_its_head_loads(
        models, tmp_path):
    tok = models["tok"]
    tiny_llama(len(tok), seed=4).save_pretrained(tmp_path / "causal-lm")   # a base LM: no head
    models["rm"].save_pretrained(tmp_path / "reward-model")               # a trained head
    for name in ("causal-lm", "reward-model"):
        tok.save_pretrained(tmp_path / name)
    large = (tiny_llama(len(tok), seed=1), tok)
    with pytest.raises(ModelLoadError, match=r"no trained reward head: its checkpoint lacks "
                                             r"score\.weight.*modules_to_save"):
        Engine(large, scorer=RewardModel(str(tmp_path / "causal-lm"), template=RM_TEMPLATE),
               num_kv_blocks=50, progress=False)
    engine = Engine(large, scorer=RewardModel(str(tmp_path / "reward-model"), template=RM_TEMPLATE,
                                              head_index=1),
                    num_kv_blocks=50, progress=False)
    assert engine.score(["This film"], [" is good"])[0] == pytest.approx(
        scratch_rm(models["rm"], tok, "This film", " is good"), abs=1e-4)


def test_score_of_a_response_past_the_free_kv_pool_says_so_and_the_search_beside_goes_on(models):
    tok = models["tok"]
    engine = Engine((tiny_llama(len(tok), seed=1, layers=3), tok),
                    scorer=RewardModel((clone_rm(models["rm"]), tok), template=RM_TEMPLATE),
                    num_kv_blocks=60, block_size=4, progress=False)
    r = engine.add_request("I really", SearchParams(w=2, k=2, l=2, max_new_tokens=8, seed=1))
    engine.step()
    with pytest.raises(ValueError, match=r"responses\[1\]: .* tokens for the scorer, and its "
                                         r"KV pool has room for .* score fewer or shorter"):
        engine.score(["I really", "This film"], [" ok", "x" * 400])
    while engine.has_unfinished():
        engine.step()
    assert r.status.name == "DONE"
    engine.check_all_free()


TRIMMING = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}<eos>"
            "{% endfor %}")


@torch.no_grad()
def scratch_chat_rm(model, tok, prompt, response) -> float:
    """The reward model's head at the last token of apply_chat_template's rendering."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": response}], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return model(torch.tensor([ids])).logits[0, 1].item()


@pytest.mark.parametrize("rm_tok, rm", [("tok", "rm"), ("other", "rm_other")],
                         ids=["large-models-tokenizer", "another-tokenizer"])
def test_a_chat_template_that_trims_the_response_scores_what_it_renders(models, rm_tok, rm):
    """Llama 3's template trims a message's text: the scorer trims each response as it does,
    so a response with whitespace at its ends (a chunk often ends in one) is scored on the
    template's own rendering, in score() and in a search."""
    tok = copy.deepcopy(models[rm_tok])
    tok.chat_template = TRIMMING
    engine = Engine((tiny_llama(len(models["tok"]), seed=1, layers=3), models["tok"]),
                    scorer=RewardModel((clone_rm(models[rm]), tok), template="chat",
                                       head_index=1),
                    num_kv_blocks=800, block_size=4, progress=False)
    responses = [" the film was great.", "the film was great.\n", " the film  ", "ok"]
    got = engine.score(["I really"] * len(responses), responses)
    want = [scratch_chat_rm(models[rm], tok, "I really", r) for r in responses]
    assert got == pytest.approx(want, abs=1e-4)
    assert got[0] == pytest.approx(got[1], abs=1e-5)   # the same text once trimmed
    for r in engine.search(PROMPTS, SearchParams(w=2, k=2, l=3, max_new_tokens=9, seed=4)):
        for h in r.hypotheses:
            assert h.reward == pytest.approx(scratch_chat_rm(models[rm], tok, r.prompt, h.text),
                                             abs=1e-4)
    with pytest.raises(ValueError, match="pass the response as text|one vocabulary"):
        engine.score(["I really"], [[5, 6, 7]])
    engine.check_all_free()


def test_a_chat_template_that_changes_the_response_otherwise_is_named_at_load(models, caplog):
    """A template that moves a reasoning block out of the assistant's text (Qwen3's) is not
    followed: each response is scored as it is inside the turn, and a warning at load says
    so. One that only trims it is followed (above), and one that keeps it says nothing."""
    import logging
    tok = copy.deepcopy(models["tok"])
    large = (tiny_llama(len(tok), seed=1), models["tok"])
    moving = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}"
              "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}"
              "<eos>{% endfor %}")
    keeping = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    for template, warns in [(moving, True), (TRIMMING, False), (keeping, False)]:
        tok.chat_template = template
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="w2s_engine"):
            Engine(large, scorer=RewardModel((clone_rm(models["rm"]), tok), template="chat"),
                   num_kv_blocks=50, progress=False)
        said = [r.getMessage() for r in caplog.records if "changes the assistant's text" in
                r.getMessage()]
        assert bool(said) == warns
        if warns:
            assert "as '<eos>assistant: \\n\\n{response}\\n <eos>'" in said[0], said[0]


def test_a_text_templated_reward_model_reads_its_bos_unless_its_spec_or_checkpoint_says_not(
        models, tmp_path):
    """A reward model is trained on tok(text), its BOS first (trl's RewardTrainer): a text
    template's rendering is scored with it by default; special_tokens=False, or a
    checkpoint's w2s_scorer.json saying false, scores it without (the bundled RM's rule)."""
    import json
    tok = models["tok"]
    large = (tiny_llama(len(tok), seed=1), tok)
    before = RM_TEMPLATE.split("{response}")[0].replace("{prompt}", "This film")

    @torch.no_grad()
    def forward(ids):
        ids = ids + tok("<eos>", add_special_tokens=False)["input_ids"]
        return models["rm"](torch.tensor([ids])).logits[0, 1].item()
    with_bos = forward(tok(before + " is good")["input_ids"])
    without = forward(tok(before + " is good", add_special_tokens=False)["input_ids"])
    assert abs(with_bos - without) > 1e-3      # (the test tells the two apart)

    def score(**spec):
        engine = Engine(large, scorer=RewardModel(head_index=1, **spec), num_kv_blocks=50,
                        progress=False)
        return engine.score(["This film"], [" is good"])[0]
    pair = (clone_rm(models["rm"]), tok)
    assert score(model=pair, template=RM_TEMPLATE) == pytest.approx(with_bos, abs=1e-4)
    assert score(model=pair, template=RM_TEMPLATE, special_tokens=False) == pytest.approx(
        without, abs=1e-4)
    models["rm"].save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    (tmp_path / "rm" / "w2s_scorer.json").write_text(json.dumps(
        {"template": RM_TEMPLATE, "special_tokens": False}))
    assert score(model=str(tmp_path / "rm")) == pytest.approx(without, abs=1e-4)
    assert score(model=str(tmp_path / "rm"), special_tokens=True) == pytest.approx(
        with_bos, abs=1e-4)
    with pytest.raises(ValueError, match="RewardModel.special_tokens='no': True, False, or None"):
        RewardModel(pair, special_tokens="no")
    (tmp_path / "rm" / "w2s_scorer.json").write_text(json.dumps({"special_tokens": "no"}))
    with pytest.raises(ModelLoadError, match="special_tokens='no': true or false"):
        score(model=str(tmp_path / "rm"))
