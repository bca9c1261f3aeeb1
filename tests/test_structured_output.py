"""Structured outputs (SearchParams.structured_output; OpenAI's response_format, vLLM's
structured outputs): every hypothesis of every method follows the structure token by token,
ends where it does, and is scored as any response; the same with async scheduling; what xgrammar
cannot read is refused naming the field."""

import json
import re

import pytest

from test_search import make_engine, small_pair, tok  # noqa: F401 (fixtures)
from w2s_engine import SearchParams
from w2s_engine.params import InvalidParam

pytest.importorskip("xgrammar", reason="structured outputs need xgrammar")

SCHEMA = {"type": "object", "properties": {"verdict": {"enum": ["good", "bad"]},
                                           "stars": {"type": "integer", "minimum": 1,
                                                     "maximum": 5}},
          "required": ["verdict", "stars"], "additionalProperties": False}
STRUCTURES = [
    ({"regex": "[0-9]{3}-[a-z]{2,5}"},
     lambda t: re.fullmatch("[0-9]{3}-[a-z]{2,5}", t) is not None),
    ({"choice": ["great film", "awful film", "so-so"]},
     lambda t: t in ("great film", "awful film", "so-so")),
    # (compact: random tiny models would pad free whitespace for ever)
    ({"json": SCHEMA, "any_whitespace": False}, lambda t: set(json.loads(t)) == {
        "verdict", "stars"} and json.loads(t)["verdict"] in ("good", "bad")
     and isinstance(json.loads(t)["stars"], int)),
    ({"json_object": True, "any_whitespace": False}, lambda t: isinstance(json.loads(t), dict)),
    ({"grammar": 'root ::= "yes" | "no" | "maybe so"'}, lambda t: t in ("yes", "no", "maybe so")),
]


@pytest.fixture(scope="module", params=[False, True], ids=["waiting", "async"])
def engine(request, tok, small_pair):  # noqa: F811
    return make_engine(tok, small_pair, async_scheduling=request.param)


@pytest.mark.parametrize("method", ["cbs", "best_of_n", "base"])
@pytest.mark.parametrize("structure, follows", STRUCTURES, ids=[next(iter(s)) for s, _ in
                                                                STRUCTURES])
def test_every_hypothesis_follows_the_structure_and_ends_where_it_does(engine, method,
                                                                      structure, follows):
    params = {"cbs": SearchParams.cbs(2, 2, 3), "best_of_n": SearchParams.best_of_n(4),
              "base": SearchParams.base(n=2)}[method].copy(
        max_new_tokens=48, seed=7, temperature=0.8, structured_output=structure)
    ended = 0
    for res in engine.search(["I really", "The plot of"], params):
        for h in res.hypotheses:
            if h.finish_reason == "stop":      # the structure is complete, then EOS
                assert follows(h.text), h.text
                ended += 1
            if h.reward is not None:    # scored as any response is
                want = engine.score([res.prompt], [h.small_token_ids], finished=h.finished)[0]
                assert h.reward == pytest.approx(want, abs=1e-4)
    assert ended, "some hypothesis should have completed its structure"
    engine.check_all_free()


def test_a_cut_response_is_a_prefix_the_structure_can_still_complete(engine):
    import xgrammar as xgr
    res = engine.search(["I really"], SearchParams.base(
        n=3, max_new_tokens=5, seed=2, structured_output={"json": SCHEMA}))[0]
    for h in res.hypotheses:
        assert h.finish_reason == "length" and h.text.startswith("{")
        matcher = xgr.GrammarMatcher(engine.large.guides.compile({"json": SCHEMA}))
        assert matcher.accept_string(h.text) and not matcher.is_terminated()


def test_a_seeded_structured_search_is_the_same_batched_as_alone(engine):
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=30, seed=11,
                              structured_output={"json_object": True})
    alone = engine.search(["This film"], params)[0]
    batched = engine.search(["I really", "This film", "What a"], params)[1]
    assert [h.token_ids for h in batched.hypotheses] == [h.token_ids for h in alone.hypotheses]


@pytest.mark.parametrize("structure, says", [
    ({"regex": "[0-9"}, "not a regex this engine can follow"),
    ({"json": {"type": "no such type"}}, "not a json this engine can follow"),
    ({"grammar": "root ::= "}, "not a grammar this engine can follow"),
    ({"yaml": "x"}, "must be a dict of one of json"),
    ({"choice": []}, "choice takes a list"),
])
def test_what_xgrammar_cannot_read_is_refused_naming_structured_output(engine, structure, says):
    with pytest.raises(InvalidParam, match=re.escape(says)) as e:
        engine.make_request("x", SearchParams(structured_output=structure))
    assert e.value.field == "structured_output"
    assert ".cc:" not in str(e.value)     # xgrammar's words, not its C++ source's place


def test_a_choice_past_the_basic_plane_is_written_as_given(engine):
    """guided_choice strings with emoji (characters past U+FFFF): a finished response is one
    of them, not the bytes of their JSON-escaped surrogate halves (U+FFFD in the text)."""
    choices = ["\U0001F44D yes", "\U0001F44E no"]
    res = engine.search(["I really"], SearchParams.base(
        n=3, max_new_tokens=40, seed=5, structured_output={"choice": choices}))[0]
    for h in res.hypotheses:
        assert h.finish_reason == "stop" and h.text in choices, h.text
    engine.check_all_free()


def test_a_structure_with_ignore_eos_or_min_tokens_is_refused(engine):
    for extra in ({"ignore_eos": True}, {"min_tokens": 3}):
        with pytest.raises(InvalidParam, match="leave (ignore_eos|min_tokens) out"):
            engine.make_request("x", SearchParams(structured_output={"json_object": True},
                                                  **extra))


@pytest.fixture(scope="module")
def server():
    from live_server import LiveServer
    from test_server import tiny_engine
    live = LiveServer(tiny_engine())
    yield live
    live.stop()


def follows_so_far(server, structure, text: str) -> bool:
    import xgrammar as xgr
    matcher = xgr.GrammarMatcher(server.async_engine.engine.large.guides.compile(structure))
    return matcher.accept_string(text)


def test_the_server_takes_openai_response_format_and_vllm_structured_outputs(server):
    client = server.client
    search = {"seed": 3, "w": 2, "k": 2, "l": 3}
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Rate the film."}], max_tokens=40,
        extra_body=search, response_format={"type": "json_schema", "json_schema": {
            "name": "rating", "schema": SCHEMA}})
    text = chat.choices[0].message.content
    assert follows_so_far(server, {"json": SCHEMA}, text)
    if chat.choices[0].finish_reason == "stop":
        assert json.loads(text)["verdict"] in ("good", "bad")
    free = client.completions.create(model="tiny", prompt="The film was", max_tokens=6,
                                     extra_body=search)
    text = client.completions.create(model="tiny", prompt="The film was", max_tokens=6,
                                     extra_body={**search, "response_format": {"type": "text"}})
    assert text.choices[0].text == free.choices[0].text      # text: free text, as without
    c = client.completions.create(model="tiny", prompt="The film was", max_tokens=20,
                                  extra_body={**search, "guided_choice": ["good", "bad"]})
    assert c.choices[0].text in ("good", "bad") and c.choices[0].finish_reason == "stop"
    c = client.completions.create(model="tiny", prompt="The film was", max_tokens=40, extra_body={
        **search, "structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}})
    assert c.choices[0].finish_reason == "stop"
    assert json.loads(c.choices[0].text)["verdict"] in ("good", "bad")
    r = client.responses.create(model="tiny", input="Rate the film.", max_output_tokens=20,
                                extra_body={**search, "guided_regex": "[1-5] stars"})
    assert re.fullmatch("[1-5] stars", r.output_text) and r.status == "completed"
    r = client.responses.create(model="tiny", input="Rate the film.", max_output_tokens=40,
                                extra_body=search, text={"format": {
                                    "type": "json_schema", "name": "rating", "schema": SCHEMA}})
    assert follows_so_far(server, {"json": SCHEMA}, r.output_text)
    assert r.text.format.type == "json_schema"
    server.async_engine.engine.check_all_free()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"guided_regex": "[0-9", "prompt": "x"}, "guided_regex"),
    ("/v1/completions", {"guided_json": {"type": "nope"}, "prompt": "x"}, "guided_json"),
    ("/v1/completions", {"guided_choice": ["a"], "guided_regex": "a", "prompt": "x"},
     "guided_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}},
     "structured_outputs"),
    ("/v1/chat/completions", {"structured_outputs": {"structural_tag": "t"}},
     "structured_outputs.structural_tag"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "ignore_eos": True},
     "response_format"),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema"}}},
     "text.format.schema"),
    # (the Responses API's structure is its text.format: never the chat's response_format)
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_object"}},
                       "ignore_eos": True}, "text.format"),
    ("/v1/responses", {"input": "x", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "no such type"}}}},
     "text.format"),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_object"}},
                       "guided_regex": "a"}, "guided_regex"),
])
def test_a_structure_the_engine_cannot_follow_is_refused_naming_its_field(server, path, body,
                                                                         param):
    from test_server import is_envelope, raw_post
    if path == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": "x"}], **body}
    code, payload = raw_post(server.port, path, json.dumps({"max_tokens": 4, **body}).encode()
                             if path != "/v1/responses" else json.dumps(body).encode())
    assert code == 400 and is_envelope(payload, 400), payload
    assert payload["error"]["param"] == param, payload
    if path == "/v1/responses":    # (a field it has not)
        assert "response_format" not in payload["error"]["message"], payload
