"""The OpenAI parameters (issue 18): each one honoured, or refused with 400 naming it; models
by name; token-id prompts; log-probabilities that are the large model's own."""

import json

import pytest
import torch

from live_server import LiveServer
from test_server import is_envelope, raw_post, tiny_engine
from tiny_models import clone, make_tokenizer, tiny_granite, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams
from w2s_engine.params import InvalidParam

CHAT = [{"role": "user", "content": "Write a review."}]


@pytest.fixture(scope="module")
def server():
    live = LiveServer(tiny_engine(), model_name=["tiny", "alias"])
    yield live
    live.stop()


def post(server, path, body):
    return raw_post(server.port, path, json.dumps(body).encode())


def test_max_tokens_and_max_completion_tokens_are_honoured(server):
    chat = server.client.chat.completions.create(
        model="tiny", messages=CHAT, max_completion_tokens=5, seed=1,
        extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"
    both = server.client.chat.completions.create(   # the newer name wins, as in vLLM
        model="tiny", messages=CHAT, max_tokens=9, max_completion_tokens=3, seed=1,
        extra_body={"ignore_eos": True})
    assert both.usage.completion_tokens == 3
    c = server.client.completions.create(model="tiny", prompt="I really", max_tokens=4,
                                         seed=1, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 4
    code, payload = post(server, "/v1/chat/completions",
                         {"messages": CHAT, "max_completion_tokens": 0})
    assert code == 400 and payload["error"]["param"] == "max_completion_tokens"
    assert "max_completion_tokens=0" in payload["error"]["message"]


def test_n_is_the_n_best_hypotheses_of_a_search_and_n_samples_of_base(server):
    c = server.client.completions.create(model="tiny", prompt="I really", max_tokens=8, seed=2,
                                         n=3, extra_body={"w": 3, "k": 2, "l": 3})
    hyps = c.model_extra["w2s"]["hypotheses"]
    assert [ch.text for ch in c.choices] == [h["text"] for h in hyps[:3]]
    assert [h["reward"] for h in hyps] == sorted((h["reward"] for h in hyps), reverse=True)
    base = server.client.completions.create(model="tiny", prompt="I really", max_tokens=8,
                                            seed=2, n=3, extra_body={"method": "base"})
    assert len(base.choices) == 3 and len({ch.text for ch in base.choices}) > 1
    chat = server.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5,
                                                 seed=2, n=2, extra_body={"w": 2})
    assert [ch.index for ch in chat.choices] == [0, 1]
    eft = server.client.completions.create(model="tiny", prompt="I really", max_tokens=8,
                                           seed=2, n=2, extra_body={"method": "eft"})
    assert len(eft.choices) == 2 and eft.choices[0].text != eft.choices[1].text
    for body, param in [({"n": 3, "w": 2}, "n"),
                        ({"n": 4, "method": "best_of_n", "k": 3}, "n"), ({"n": 0}, "n")]:
        code, payload = post(server, "/v1/completions", {"prompt": "x", **body})
        assert code == 400 and payload["error"]["param"] == param, payload


def test_best_of_is_best_of_n_and_n_takes_its_best(server):
    common = dict(model="tiny", prompt="I really", max_tokens=8, seed=3)
    a = server.client.completions.create(**common, best_of=4)
    b = server.client.completions.create(**common, extra_body={"method": "best_of_n", "k": 4})
    assert a.choices[0].text == b.choices[0].text
    assert a.model_extra["w2s"]["stats"]["chunks"] == 1
    two = server.client.completions.create(**common, best_of=4, n=2)
    rewards = [h["reward"] for h in two.model_extra["w2s"]["hypotheses"]]
    assert len(two.choices) == 2 and rewards == sorted(rewards, reverse=True)
    # the same 4 samples: the best of them first, then the second best
    assert two.choices[0].text == a.choices[0].text
    assert two.model_extra["w2s"]["stats"]["tokens_sampled"] == \
        a.model_extra["w2s"]["stats"]["tokens_sampled"]
    # N need not be a multiple of n: the 2 best of 3
    one_of_3 = server.client.completions.create(**common, best_of=3)
    two_of_3 = server.client.completions.create(**common, best_of=3, n=2)
    assert len(two_of_3.choices) == 2 and two_of_3.choices[0].text == one_of_3.choices[0].text
    rewards = [h["reward"] for h in two_of_3.model_extra["w2s"]["hypotheses"]]
    assert rewards == sorted(rewards, reverse=True)
    for body, param in [({"best_of": 2, "n": 3}, "best_of"),
                        ({"best_of": 4, "method": "cbs"}, "best_of"),
                        ({"best_of": 4, "k": 3}, "best_of"), ({"best_of": 0}, "best_of")]:
        code, payload = post(server, "/v1/completions", {"prompt": "x", **body})
        assert code == 400 and payload["error"]["param"] == param, payload
    code, payload = post(server, "/v1/chat/completions", {"messages": CHAT, "best_of": 2})
    assert code == 400 and payload["error"]["param"] == "best_of"


def test_echo_prepends_the_prompt(server):
    c = server.client.completions.create(model="tiny", prompt="I really", max_tokens=4, seed=1,
                                         echo=True)
    plain = server.client.completions.create(model="tiny", prompt="I really", max_tokens=4,
                                             seed=1)
    assert c.choices[0].text == "I really" + plain.choices[0].text
    for path, body in [("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}),
                       ("/v1/chat/completions", {"messages": CHAT, "echo": True})]:
        code, payload = post(server, path, body)
        assert code == 400 and payload["error"]["param"] == "echo", payload


def test_logprobs_of_completions_and_chat(server):
    c = server.client.completions.create(model="tiny", prompt="I really", max_tokens=6, seed=1,
                                         logprobs=2, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == value and 1 <= len(top) <= 3
        assert max(top.values()) >= value
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chat = server.client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=4, seed=1, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 4
    # A token's own bytes: its text's UTF-8, unless it holds part of a character (the text
    # is then U+FFFD, the bytes the part).
    assert all(len(t.top_logprobs) == 3 and (t.bytes == list(t.token.encode())
                                             or "\ufffd" in t.token) for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)
    none = server.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
    assert none.choices[0].logprobs is None
    for path, body, param in [
            ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
            ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
            ("/v1/chat/completions", {"messages": CHAT, "logprobs": 1}, "logprobs"),
            ("/v1/completions", {"prompt": "x", "top_logprobs": 2}, "top_logprobs")]:
        code, payload = post(server, path, body)
        assert code == 400 and payload["error"]["param"] == param, payload


@pytest.mark.parametrize("large_arch", ["llama", "granite"])   # Granite scales its logits
def test_logprobs_are_the_large_models_own_for_every_method(large_arch):
    tok = make_tokenizer(300)
    untuned = tiny_llama(len(tok), seed=2)
    large = {"llama": tiny_llama, "granite": tiny_granite}[large_arch](len(tok), seed=1, layers=3)
    reference = clone(large)
    engine = Engine((large, tok), (tuned_from(untuned, seed=3, scale=0.3), tok),
                    (clone(untuned), tok), num_kv_blocks=600, block_size=4, progress=False)
    for params in (SearchParams.cbs(2, 2, 3, max_new_tokens=9, seed=1),
                   SearchParams.base(n=2, max_new_tokens=7, seed=2),
                   SearchParams.eft(1.0, max_new_tokens=6, seed=1)):
        req = engine.enqueue(engine.make_request("I really", params, logprobs=3))
        while not req.status.ended:
            engine.step()
        # the Python API's keyword gives the same (to rounding: it reads the prompt's keys
        # and values the first search left in the prefix cache)
        same = engine.search("I really", params, logprobs=3)[0]
        for a, b in zip(same.hypotheses, req.result.hypotheses, strict=True):
            assert [(e.token_id, [t for t, _ in e.top]) for e in a.logprobs] == \
                [(e.token_id, [t for t, _ in e.top]) for e in b.logprobs]
            assert [x for e in a.logprobs for x in (e.logprob, *(p for _, p in e.top))] == \
                pytest.approx([x for e in b.logprobs for x in (e.logprob, *(p for _, p in e.top))],
                              abs=1e-5)
        for h in req.result.hypotheses:
            assert [e.token_id for e in h.logprobs] == h.token_ids
            ids = req.large_prompt_ids + h.token_ids
            with torch.no_grad():
                logp = reference(torch.tensor([ids])).logits[0].log_softmax(-1)
            start = len(req.large_prompt_ids) - 1
            for j, e in enumerate(h.logprobs):
                assert e.logprob == pytest.approx(logp[start + j, e.token_id].item(), abs=1e-4)
                top = logp[start + j].topk(3)
                assert [t for t, _ in e.top] == top.indices.tolist()
    plain = engine.search(["I really"], SearchParams.cbs(2, 2, 3, max_new_tokens=9, seed=1))[0]
    assert all(h.logprobs is None for h in plain.hypotheses)
    for bad in (21, -1, "3", 2.0):
        with pytest.raises(InvalidParam, match=r"logprobs=.*integer in \[0, 20\]"):
            engine.search("I really", SearchParams.base(max_new_tokens=2), logprobs=bad)
    assert [h.token_ids for h in plain.hypotheses] == [h.token_ids for h in
                                                       engine.search(["I really"], SearchParams.cbs(
                                                           2, 2, 3, max_new_tokens=9, seed=1))[0]
                                                       .hypotheses]
    engine.check_all_free()


def test_stop_seed_user_and_ignore_eos(server):
    common = dict(model="tiny", prompt="I really", max_tokens=12, seed=7)
    a = server.client.completions.create(**common, user="someone")
    b = server.client.completions.create(**common)
    assert a.choices[0].text == b.choices[0].text
    others = {server.client.completions.create(**{**common, "seed": s}).choices[0].text
              for s in (8, 9, 10)}
    assert len(others | {a.choices[0].text}) > 1
    # Plain sampling with one seed draws the same tokens up to the stop string: a cut.
    base = {**common, "extra_body": {"method": "base", "ignore_eos": True}}
    text = server.client.completions.create(**base).choices[0].text
    stop = next(c for c in text[1:] if c.isascii() and c.isprintable())
    cut = server.client.completions.create(**base, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra["stop_reason"] == stop
    # vLLM's include_stop_str_in_output, whole and streamed
    kept = server.client.completions.create(
        **{**base, "extra_body": {**base["extra_body"], "include_stop_str_in_output": True}},
        stop=[stop])
    assert kept.choices[0].text == text[:text.find(stop) + 1]
    chunks = list(server.client.completions.create(
        **{**base, "extra_body": {**base["extra_body"], "include_stop_str_in_output": True}},
        stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == kept.choices[0].text
    assert chunks[-1].choices[0].model_extra["stop_reason"] == stop
    assert server.client.completions.create(**base).usage.completion_tokens == 12


def test_stop_token_ids_end_a_response_as_the_python_apis_and_bad_ones_are_refused(server):
    engine = tiny_engine()      # the same models (the server's engine is its loop thread's)
    body = dict(prompt="I really", max_tokens=10, seed=3, temperature=1.0)
    free = server.client.completions.create(model="tiny", **body,
                                            extra_body={"method": "base", "ignore_eos": True})
    ids = engine.search(["I really"], SearchParams.base(max_new_tokens=10, seed=3,
                                                        temperature=1.0, ignore_eos=True))[0]
    assert free.choices[0].text == ids.text and len(ids.token_ids) == 10
    stop_id = ids.token_ids[3]          # a token it samples: the response ends before it
    cut = server.client.completions.create(
        model="tiny", **body,
        extra_body={"method": "base", "ignore_eos": True, "stop_token_ids": [stop_id]})
    first = ids.token_ids.index(stop_id)
    assert cut.choices[0].text == engine.large_tokenizer.decode(ids.token_ids[:first])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == first
    assert cut.choices[0].model_extra["stop_reason"] == stop_id      # vLLM's field
    assert free.choices[0].model_extra["stop_reason"] is None
    for value in ([10**6], [-1], ["7"], 7, [1.5]):
        code, payload = post(server, "/v1/completions", {"prompt": "x", "stop_token_ids": value})
        assert code == 400 and payload["error"]["param"].startswith("stop_token_ids"), payload
    engine.check_all_free()


def test_the_score_api_gives_the_scorers_rewards_as_the_python_api_and_refuses_bad_pairs(
        server):
    """vLLM's score API (POST /v1/score and /score) over the engine's scorer: one prompt and
    many responses, or one prompt per response; `finished` (w2s's) as score() takes it."""
    engine = tiny_engine()     # the same models (the server's engine is its loop thread's)
    responses = [" a dog", " the man and his dog", " nothing at all"]
    want = engine.score(["I really"] * 3, responses)
    code, one_to_many = post(server, "/v1/score", {"model": "tiny", "text_1": "I really",
                                                   "text_2": responses})
    assert code == 200, one_to_many
    assert one_to_many["object"] == "list" and one_to_many["model"] == "tiny"
    assert [d["index"] for d in one_to_many["data"]] == [0, 1, 2]
    assert [d["object"] for d in one_to_many["data"]] == ["score"] * 3
    assert [d["score"] for d in one_to_many["data"]] == pytest.approx(want, abs=1e-5)
    # usage (vLLM's): the tokens the scorer read, each pair's prompt and response in the
    # small models' tokens (one stream here: the pair shares its tokenizer and template)
    tok = engine.large_tokenizer      # the small models' too
    read = sum(len(tok("I really" + r, add_special_tokens=False).input_ids) for r in responses)
    assert one_to_many["usage"] == {"prompt_tokens": read, "total_tokens": read,
                                    "completion_tokens": 0}
    prompts = ["I really", "What a", "This film"]
    flags = [True, False, True]
    code, pairwise = post(server, "/score", {"text_1": prompts, "text_2": responses,
                                             "finished": flags})
    assert code == 200, pairwise
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(
        engine.score(prompts, responses, finished=flags), abs=1e-5)
    code, single = post(server, "/v1/score", {"text_1": "I really", "text_2": " a dog",
                                              "finished": False})
    assert code == 200 and single["data"][0]["score"] == pytest.approx(
        engine.score(["I really"], [" a dog"], finished=False)[0], abs=1e-5)
    for body, param in [({"text_1": ["a", "b"], "text_2": ["x", "y", "z"]}, "text_2"),
                        ({"text_1": [], "text_2": ["x"]}, "text_1"),
                        ({"text_1": "a", "text_2": []}, "text_2"),
                        ({"text_1": "a", "text_2": ["x", "y"], "finished": [True]}, "finished"),
                        ({"text_1": "a", "text_2": ["x"] * 257}, "text_2"),
                        ({"text_1": "a", "text_2": 7}, "text_2"),
                        ({"text_2": "x"}, "text_1"),
                        ({"text_1": "a", "text_2": "x", "truncate_prompt_tokens": 3},
                         "truncate_prompt_tokens")]:
        code, payload = post(server, "/v1/score", body)
        assert code == 400 and is_envelope(payload, 400), (body, payload)
        assert payload["error"]["param"] == param, (body, payload)
    code, payload = post(server, "/v1/score", {"model": "gpt-4", "text_1": "a", "text_2": "x"})
    assert code == 404 and payload["error"]["param"] == "model"
    engine.check_all_free()


def test_rerank_orders_the_documents_by_the_scorers_reward_best_first(server):
    engine = tiny_engine()
    docs = [" a dog", " the man and his dog", " nothing at all", " a cat finds a dog"]
    want = engine.score(["I really"] * 4, docs)
    best_first = sorted(range(4), key=lambda i: -want[i])
    code, ranked = post(server, "/v1/rerank", {"model": "tiny", "query": "I really",
                                               "documents": docs})
    assert code == 200, ranked
    assert [r["index"] for r in ranked["results"]] == best_first
    assert [r["relevance_score"] for r in ranked["results"]] == pytest.approx(
        [want[i] for i in best_first], abs=1e-5)
    assert [r["document"]["text"] for r in ranked["results"]] == [docs[i] for i in best_first]
    read = sum(len(engine.large_tokenizer("I really" + d, add_special_tokens=False).input_ids)
               for d in docs)
    assert ranked["usage"] == {"prompt_tokens": read, "total_tokens": read}
    code, top = post(server, "/rerank", {"query": "I really", "documents": docs, "top_n": 2,
                                         "return_documents": False, "finished": False})
    unfinished = engine.score(["I really"] * 4, docs, finished=False)
    assert code == 200 and [r["index"] for r in top["results"]] == sorted(
        range(4), key=lambda i: -unfinished[i])[:2]
    assert all(r["document"] is None for r in top["results"])
    for body, param in [({"query": "x", "documents": []}, "documents"),
                        ({"query": "x", "documents": ["a"], "top_n": 0}, "top_n"),
                        ({"documents": ["a"]}, "query"),
                        ({"query": "x", "documents": ["a"], "truncate_prompt_tokens": 5},
                         "truncate_prompt_tokens")]:
        code, payload = post(server, "/v1/rerank", body)
        assert code == 400 and payload["error"]["param"] == param, (body, payload)
    engine.check_all_free()


def test_the_score_api_runs_beside_searches_and_a_server_without_a_scorer_refuses_it():
    import threading
    live = LiveServer(tiny_engine())
    try:
        results = {}

        def search():
            results["search"] = live.client.completions.create(
                model="tiny", prompt="I really", max_tokens=24, seed=1,
                extra_body={"w": 2, "k": 2, "l": 3, "ignore_eos": True})
        t = threading.Thread(target=search)
        t.start()
        scores = [post(live, "/v1/score", {"text_1": "I really", "text_2": [" a dog"] * 4})
                  for _ in range(6)]
        t.join()
        assert all(code == 200 for code, _ in scores), scores
        first = [d["score"] for d in scores[0][1]["data"]]
        for _, payload in scores:   # (to rounding: the prompt's keys may come from the cache)
            assert [d["score"] for d in payload["data"]] == pytest.approx(first, abs=1e-5)
        assert results["search"].usage.completion_tokens == 24
    finally:
        live.stop()
    tok = make_tokenizer(300)
    alone = LiveServer(Engine((tiny_llama(len(tok), seed=1), tok), num_kv_blocks=200,
                              block_size=4, progress=False))
    try:
        code, payload = post(alone, "/v1/score", {"text_1": "a", "text_2": "x"})
        assert code == 400 and "no scorer" in payload["error"]["message"], payload
    finally:
        alone.stop()


def test_tokenize_gives_the_large_models_prompt_tokens_of_each_endpoint_and_detokenize_its_text(
        server):
    """vLLM's /tokenize and /detokenize: the ids a completions or chat request's large model
    reads (its template applied), so that `count` is that request's prompt_tokens."""
    c = server.client.completions.create(model="tiny", prompt="I really", max_tokens=2, seed=1)
    code, by_text = post(server, "/tokenize", {"model": "tiny", "prompt": "I really",
                                               "return_token_strs": True})
    assert code == 200, by_text
    assert by_text["count"] == len(by_text["tokens"]) == c.usage.prompt_tokens
    assert by_text["max_model_len"] == 512 and len(by_text["token_strs"]) == by_text["count"]
    chat = server.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2,
                                                 seed=1)
    code, by_chat = post(server, "/tokenize", {"messages": CHAT})
    assert code == 200 and by_chat["count"] == chat.usage.prompt_tokens, by_chat
    assert by_chat["token_strs"] is None
    code, text = post(server, "/detokenize", {"model": "tiny", "tokens": by_text["tokens"]})
    assert code == 200 and text["prompt"].endswith("I really"), text
    for path, body, param in [
            ("/tokenize", {"prompt": "x", "messages": CHAT}, "messages"),
            ("/tokenize", {}, "prompt"),
            ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, "add_generation_prompt"),
            ("/tokenize", {"prompt": "x", "add_special_tokens": False}, "add_special_tokens"),
            ("/tokenize", {"messages": CHAT, "add_generation_prompt": False},
             "add_generation_prompt"),
            ("/tokenize", {"prompt": ""}, "prompt"),
            ("/detokenize", {"tokens": [5, 300]}, "tokens.1"),
            ("/detokenize", {"tokens": ["5"]}, "tokens.0")]:
        code, payload = post(server, path, body)
        assert code == 400 and is_envelope(payload, 400), (body, payload)
        assert payload["error"]["param"] == param, (body, payload)
    code, payload = post(server, "/tokenize", {"model": "gpt-4", "prompt": "x"})
    assert code == 404
    code, payload = raw_post(server.port, "/version", b"", method="GET")
    assert code == 200 and payload["version"]


@pytest.mark.parametrize("field, value", [
    ("prediction", {"type": "content", "content": "x"}), ("suffix", "x"),
    ("stream_options", {"include_usage": True}),
    ("tools", [{"type": "function", "function": {"name": "f"}}])])
def test_features_the_engine_lacks_are_refused_naming_them(server, field, value):
    for path, body in [("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": CHAT})]:
        code, payload = post(server, path, {**body, field: value})
        assert code == 400 and is_envelope(payload, 400), payload
        assert payload["error"]["param"] == field and field in payload["error"]["message"]
    # and accepted at their neutral values
    neutral = {"suffix": ""}
    if field in neutral:
        code, _ = post(server, "/v1/completions",
                       {"prompt": "x", "max_tokens": 2, field: neutral[field]})
        assert code == 200


def test_penalties_and_logit_bias_are_the_python_apis_and_out_of_range_ones_are_refused(server):
    # The Python API's answers from an engine of the same models: the server's engine belongs
    # to its loop thread (a search from this thread would step it from two threads at once).
    engine = tiny_engine()
    body = dict(prompt="I really", max_tokens=16, seed=2, temperature=0.7,
                presence_penalty=1.2, frequency_penalty=0.4, logit_bias={"7": 3.0, "9": -100})
    c = server.client.completions.create(model="tiny", **body,
                                         extra_body={"method": "base", "repetition_penalty": 1.3})
    want = engine.search(["I really"], SearchParams.base(
        max_new_tokens=16, seed=2, temperature=0.7, presence_penalty=1.2,
        frequency_penalty=0.4, repetition_penalty=1.3, logit_bias={7: 3.0, 9: -100}))[0]
    assert c.choices[0].text == want.text and 9 not in want.token_ids
    min_p = server.client.completions.create(model="tiny", prompt="I really", max_tokens=8,
                                             seed=5, temperature=1.0,
                                             extra_body={"method": "base", "min_p": 0.3})
    assert min_p.choices[0].text == engine.search(["I really"], SearchParams.base(
        max_new_tokens=8, seed=5, temperature=1.0, min_p=0.3))[0].text
    for field, value in [("presence_penalty", 2.5), ("frequency_penalty", -2.1),
                         ("repetition_penalty", 0), ("repetition_penalty", True),
                         ("repetition_penalty", 1e-45),   # fp32 divides a logit to inf
                         ("min_p", 1.5), ("min_p", -0.1), ("min_tokens", 10**6),
                         ("min_tokens", -1)]:
        code, payload = post(server, "/v1/completions", {"prompt": "x", field: value})
        assert code == 400 and payload["error"]["param"] == field, payload
    # a key of thousands of digits: not a token id (int() of it raised: a 500), and not echoed
    code, payload = post(server, "/v1/completions", {"prompt": "x", "logit_bias": {"9" * 5000: 1}})
    assert code == 400 and payload["error"]["param"] == "logit_bias." + "9" * 40, payload
    assert len(payload["error"]["message"]) < 300


def test_models_by_name_and_a_request_for_another_model_is_404(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny", "alias"]
    assert server.client.models.retrieve("alias").id == "alias"
    code, payload = raw_post(server.port, "/v1/models/gpt-4", b"", method="GET")
    assert code == 404 and is_envelope(payload, 404) and "gpt-4" in payload["error"]["message"]
    c = server.client.completions.create(model="alias", prompt="I", max_tokens=2)
    assert c.model == "tiny"
    before = server.metrics()
    code, payload = post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert code == 404 and is_envelope(payload, 404) and payload["error"]["param"] == "model"
    assert "does not exist" in payload["error"]["message"]
    after = server.metrics()
    key = 'w2s_requests_rejected_by_reason_total{reason="model"}'
    assert after[key] == before.get(key, 0) + 1


def test_token_id_prompts_are_the_prompt_they_decode_to(server):
    tok = server.async_engine.engine.large_tokenizer
    ids = tok("I really")["input_ids"]
    by_text = server.client.completions.create(model="tiny", prompt="I really", max_tokens=6,
                                               seed=5)
    for prompt in (ids, [ids]):
        by_ids = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                                  seed=5)
        assert by_ids.choices[0].text == by_text.choices[0].text
    for prompt, param in [([5, 10**6], "prompt.1"), ([-1], "prompt.0"), ([[]], "prompt.0"),
                          ([ids, [5, 10**6]], "prompt.1.1"), ([1.5], "prompt.0"),
                          ([], "prompt"), (["x"] * 65, "prompt")]:
        code, payload = post(server, "/v1/completions", {"prompt": prompt})
        assert code == 400 and payload["error"]["param"] == param, payload


def test_chat_content_parts_are_text(server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Write"},
                                          {"type": "text", "text": "a review."}]}]
    joined = [{"role": "user", "content": "Write\na review."}]
    a = server.client.chat.completions.create(model="tiny", messages=parts, max_tokens=5, seed=1)
    b = server.client.chat.completions.create(model="tiny", messages=joined, max_tokens=5, seed=1)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_token_id_prompts_reach_the_large_model_as_sent_special_tokens_included(server):
    tok = server.async_engine.engine.large_tokenizer
    ids = tok("I really")["input_ids"] + [tok.eos_token_id] + tok("This film")["input_ids"]
    c = server.client.completions.create(model="tiny", prompt=ids, max_tokens=3, seed=5,
                                         echo=True)
    assert c.usage.prompt_tokens == len(ids)              # not re-tokenized: nothing dropped
    assert c.choices[0].text.startswith(tok.decode(ids))  # echo: the ids' text, specials in
    assert "<eos>" in c.choices[0].text
    code, payload = post(server, "/v1/completions", {"prompt": [tok.bos_token_id],
                                                     "max_tokens": 2, "method": "base"})
    assert code == 200, payload   # special tokens alone are a prompt too


def chat_tokenizer():
    tok = make_tokenizer(300)
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    return tok


def test_completions_on_a_chat_server_apply_no_chat_template():
    tok = chat_tokenizer()
    untuned = tiny_llama(len(tok), seed=2)
    engine = Engine((tiny_llama(len(tok), seed=1), tok), (tuned_from(untuned, seed=3), tok),
                    (clone(untuned), tok), chat=True, block_size=4, num_kv_blocks=2000,
                    progress=False)
    live = LiveServer(engine)
    try:
        prompt = "user: hello\nassistant:"
        c = live.client.completions.create(model="tiny", prompt=prompt, max_tokens=3, seed=1)
        assert c.usage.prompt_tokens == len(tok(prompt)["input_ids"])
        ids = tok(prompt)["input_ids"]
        by_ids = live.client.completions.create(model="tiny", prompt=ids, max_tokens=3, seed=1)
        assert by_ids.usage.prompt_tokens == len(ids)
        assert by_ids.choices[0].text == c.choices[0].text
        chat = live.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=3, seed=1)
        rendered = tok.apply_chat_template([{"role": "user", "content": "hello"}],
                                           tokenize=False, add_generation_prompt=True)
        assert chat.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)
                                               ["input_ids"])
    finally:
        live.stop()


@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "skip_special_tokens", False),
    ("/v1/completions", "truncate_prompt_tokens", 4),
    ("/v1/completions", "add_special_tokens", False),
    ("/v1/chat/completions", "chat_template", "{{ messages }}"),
    ("/v1/chat/completions", "reasoning_effort", "high")])
def test_vllm_fields_that_would_change_the_output_are_refused_naming_them(server, path, field,
                                                                          value):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": CHAT}
    code, payload = post(server, path, {**body, "max_tokens": 2, field: value})
    assert code == 400 and payload["error"]["param"] == field, payload
    assert "not supported" in payload["error"]["message"]


def test_continue_final_message_continues_the_assistants_text_as_vllm_does():
    """An assistant prefill: with continue_final_message=true and add_generation_prompt=false
    the prompt is the chat template's rendering with the last message left open (transformers'
    continue_final_message), the answer is only what follows; vLLM's refusals of the other
    combinations."""
    tok = chat_tokenizer()
    untuned = tiny_llama(len(tok), seed=2)
    engine = Engine((tiny_llama(len(tok), seed=1), tok), (tuned_from(untuned, seed=3), tok),
                    (clone(untuned), tok), chat=True, block_size=4, num_kv_blocks=2000,
                    progress=False)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Sure, it"}]
    # the same search from the Python API (before the server's thread owns the engine)
    want = engine.search(messages, SearchParams.cbs(2, 2, 2, max_new_tokens=4, seed=1),
                         continue_final_message=True)[0]
    live = LiveServer(engine)
    try:
        c = live.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=4, seed=1,
            extra_body={"continue_final_message": True, "add_generation_prompt": False,
                        "w": 2, "k": 2, "l": 2})
        rendered = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        assert rendered.endswith("assistant: Sure, it")
        assert c.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
        assert c.choices[0].message.content == want.text     # the continuation alone
        for extra, param in [({"continue_final_message": True}, "add_generation_prompt"),
                             ({"add_generation_prompt": False}, "add_generation_prompt")]:
            code, payload = post(live, "/v1/chat/completions",
                                 {"messages": messages, "max_tokens": 2, **extra})
            assert code == 400 and payload["error"]["param"] == param, payload
        code, payload = post(live, "/v1/chat/completions",
                             {"messages": messages[:1], "max_tokens": 2,
                              "continue_final_message": True, "add_generation_prompt": False})
        assert code == 400 and payload["error"]["param"] == "continue_final_message", payload
    finally:
        live.stop()


def test_add_special_tokens_is_taken_at_what_the_endpoint_does_here(server):
    # this server renders chat as a text transcript, which gets the tokenizer's BOS
    for path, body, does in [("/v1/completions", {"prompt": "x"}, True),
                             ("/v1/chat/completions", {"messages": CHAT}, True)]:
        code, payload = post(server, path, {**body, "max_tokens": 2, "add_special_tokens": does})
        assert code == 200, payload
        code, payload = post(server, path, {**body, "max_tokens": 2,
                                            "add_special_tokens": not does})
        assert code == 400 and payload["error"]["param"] == "add_special_tokens", payload


def test_vllm_fields_at_their_defaults_are_accepted(server):
    for path, body in [("/v1/completions", {"prompt": "x", "stop_token_ids": [],
                                            "skip_special_tokens": True,
                                            "include_stop_str_in_output": False}),
                       ("/v1/chat/completions", {"messages": CHAT, "add_generation_prompt": True,
                                                 "continue_final_message": False})]:
        code, payload = post(server, path, {**body, "max_tokens": 2})
        assert code == 200, payload


def test_null_sampling_fields_mean_their_defaults(server):
    common = dict(model="tiny", prompt="I really", max_tokens=6, seed=4)
    plain = server.client.completions.create(**common)
    nulls = server.client.completions.create(
        **common, temperature=None, top_p=None, presence_penalty=None, frequency_penalty=None,
        extra_body={"top_k": None, "min_p": None, "w": None, "k": None, "l": None, "beta": None,
                    "min_tokens": None, "repetition_penalty": None})
    assert nulls.choices[0].text == plain.choices[0].text


@pytest.mark.parametrize("body, param", [
    ({"method": "best_of_n", "k": 4, "l": 2}, "l"), ({"method": "base", "l": 3}, "l"),
    ({"method": "base", "k": 8}, "k"), ({"method": "eft", "n": 2, "k": 3}, "k"),
    ({"method": "cbs", "beta": 2.0}, "beta"), ({"method": "best_of_n", "beta": -1.0}, "beta")])
def test_search_fields_the_method_does_not_use_are_refused(server, body, param):
    code, payload = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, **body})
    assert code == 400 and payload["error"]["param"] == param, payload
    ok = {k: v for k, v in body.items() if k != param}   # the same request without it runs
    code, payload = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, **ok})
    assert code == 200, payload


def test_a_body_that_is_not_json_by_its_content_type_is_refused_with_415(server):
    import http.client
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    for kind, want in [("text/plain", 415), ("application/x-www-form-urlencoded", 415),
                       ("multipart/form-data; boundary=x", 415),
                       ("application/json; charset=utf-8", 200), ("application/vnd.api+json", 200)]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": kind})
        response = conn.getresponse()
        payload = json.loads(response.read())
        conn.close()
        assert response.status == want, (kind, payload)
        if want == 415:
            assert is_envelope(payload, 415) and "application/json" in payload["error"]["message"]
    for method, path, want in [("POST", "/health", 405), ("POST", "/v1/nope", 404)]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request(method, path, body=b"x", headers={"Content-Type": "text/plain"})
        assert conn.getresponse().status == want, path   # routing first: not a body's fault
        conn.close()


def test_chat_template_kwargs_reach_every_models_chat_template_as_vllms_do():
    # A template with a variable of its own (Qwen3's enable_thinking): every model that renders
    # the messages with its chat template gets it, through the Python API and the server.
    tok = make_tokenizer(300)
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
                         "{% if enable_thinking is defined and not enable_thinking %} no think:"
                         "{% endif %}")
    untuned = tiny_llama(len(tok), seed=2)
    engine = Engine((tiny_llama(len(tok), seed=1), tok), (tuned_from(untuned, seed=3), tok),
                    (clone(untuned), tok), chat=True, block_size=4, num_kv_blocks=2000,
                    progress=False)
    messages = [{"role": "user", "content": "hello"}]
    params = SearchParams.cbs(2, 2, 2, max_new_tokens=4, seed=1)
    off = {"enable_thinking": False}
    req = engine.make_request(messages, params, chat_template_kwargs=off)
    assert req.large_prompt_text.endswith("assistant: no think:")
    assert all(sp.text.endswith("assistant: no think:") for sp in req.small_prompts)
    plain = engine.make_request(messages, params)
    assert plain.large_prompt_text.endswith("assistant:")
    want = engine.search(messages, params, chat_template_kwargs=off)[0]
    for bad, says in [({"tokenize": True}, "tokenize is set by the engine"),
                      ([1], "must be an object")]:
        with pytest.raises(ValueError, match=says):
            engine.search(messages, params, chat_template_kwargs=bad)
    live = LiveServer(engine)
    try:
        c = live.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=4, seed=1,
            extra_body={"chat_template_kwargs": off, "w": 2, "k": 2, "l": 2})
        assert c.choices[0].message.content == want.text
        assert c.usage.prompt_tokens == len(req.large_prompt_ids)
        code, payload = post(live, "/v1/chat/completions", {
            "messages": messages, "max_tokens": 2, "chat_template_kwargs": {"messages": []}})
        assert code == 400 and payload["error"]["param"] == "chat_template_kwargs", payload
        assert "leave it out" in payload["error"]["message"]
        code, payload = post(live, "/v1/chat/completions", {
            "messages": messages, "max_tokens": 2, "chat_template_kwargs": "x"})
        assert code == 400 and payload["error"]["param"] == "chat_template_kwargs", payload
    finally:
        live.stop()
    engine.check_all_free()


def test_allowed_token_ids_and_bad_words_are_honoured_as_vllm_names_them(server):
    """The server's search with them is the Python API's (the engine tests check the tokens)."""
    engine = tiny_engine()     # the same models (the server's engine is its loop thread's)
    greedy = SearchParams.base(max_new_tokens=10, top_k=1, ignore_eos=True, seed=1)
    free = engine.search(["I really"], greedy)[0]
    tok, ids = engine.large_tokenizer, free.token_ids
    # a word of greedy decoding's own: two of its tokens whose text tokenizes back to them
    word = next(tok.decode(ids[i:i + 2]) for i in range(len(ids) - 1)
                if tok(tok.decode(ids[i:i + 2]), add_special_tokens=False)["input_ids"]
                == ids[i:i + 2])
    for extra in ({"allowed_token_ids": sorted(set(ids[:4]))}, {"bad_words": [word]}):
        want = engine.search(["I really"], greedy.copy(**extra))[0]
        assert want.text != free.text       # they change greedy decoding here
        c = server.client.completions.create(
            model="tiny", prompt="I really", max_tokens=10, seed=1,
            extra_body={"method": "base", "top_k": 1, "ignore_eos": True, **extra})
        assert c.choices[0].text == want.text
    for body, param in [({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
                        ({"allowed_token_ids": "1"}, "allowed_token_ids"),
                        ({"bad_words": [""]}, "bad_words")]:
        code, payload = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, **body})
        assert code == 400 and payload["error"]["param"] == param, payload
    engine.check_all_free()
