"""Hostile bodies against a live server while well-formed requests run (hypothesis).

Every fuzzed body starts from a valid request and carries at least one mutation that makes it
invalid (a wrong type, a huge or negative integer, NaN or Infinity as raw JSON text, a boolean
for a number, a lone surrogate, deep nesting, a body past the limit, broken UTF-8 or JSON, an
unsupported feature, a role the templates do not have), plus noise that is valid on its own
(unknown fields). Meanwhile a thread sends well-formed requests again and again. Checked:
every fuzzed body gets a 4xx in OpenAI's envelope naming a field where there is one; nothing
answers 5xx; every well-formed request gets 200 and exactly the text it gets when run alone
(same seed); the counters add up; every KV block is free at the end.
"""

import http.client
import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from live_server import LiveServer
from test_server import tiny_engine

BODY_LIMIT = 64 * 1024      # small, so that bodies near it are cheap to send

WELL_FORMED = [
    ("/v1/completions", {"prompt": "I really", "max_tokens": 6, "seed": 1, "w": 2, "k": 2,
                         "l": 3}),
    ("/v1/completions", {"prompt": "This film", "max_tokens": 6, "seed": 2, "method": "base",
                         "n": 2, "top_k": 2**31 - 1, "user": "someone", "presence_penalty": 0}),
    ("/v1/completions", {"prompt": ["The plot"], "max_tokens": 5, "seed": 2**63 - 1,
                         "method": "best_of_n", "k": 3, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be kind."},
                                           {"role": "user", "content": [
                                               {"type": "text", "text": "A review"}]}],
                              "max_tokens": 5, "seed": 3, "method": "eft", "beta": 0.5}),
]


def post(port, path, body: bytes, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def text_of(payload: dict) -> list[str]:
    return [c.get("text", c.get("message", {}).get("content")) for c in payload["choices"]]


@pytest.fixture(scope="module")
def live():
    engine = tiny_engine()
    server = LiveServer(engine, max_body_bytes=BODY_LIMIT)
    yield server
    server.stop()


# ---- the fuzzed bodies ---------------------------------------------------------------------------

RAW = "@@RAW{}@@"   # a placeholder replaced by raw JSON text after serializing


class Body:
    def __init__(self, path: str, fields: dict):
        self.path, self.fields, self.raws, self.bytes_edit = path, fields, [], None

    def __repr__(self):
        data = self.encode()
        return f"Body({self.path}, {data[:300]!r}{'...' if len(data) > 300 else ''})"

    def raw(self, text: str) -> str:
        self.raws.append(text)
        return RAW.format(len(self.raws) - 1)

    def encode(self) -> bytes:
        text = json.dumps(self.fields)
        for i, raw in enumerate(self.raws):
            text = text.replace(json.dumps(RAW.format(i)), raw)
        data = text.encode()
        return self.bytes_edit(data) if self.bytes_edit else data


huge_ints = st.sampled_from([2**31, 2**63, 10**30, -(2**63) - 1, -10**30])
wrong_types = st.sampled_from([True, False, "4", 4.5, [], {}, [1], {"a": 1}])
raw_numbers = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
surrogate = st.sampled_from(["\ud800", "\udfff", "a\udc00b"])
INT_FIELDS = {  # field -> invalid integers besides the huge ones and wrong types
    "w": [0, -1], "k": [0, -5], "l": [0, -1], "max_tokens": [0, -3], "top_k": [-2, -100],
    "n": [0, 129, 1000], "seed": [-1, 2**63]}
FLOAT_FIELDS = {"temperature": [-0.1, 101, 1e308], "top_p": [0, -1, 1.5, 1e308],
                "beta": [1e308, -1e308, 101], "repetition_penalty": [0, -1, 11, 1e308]}
UNSUPPORTED = {  # refused features, and supported ones at values invalid on both endpoints
    "presence_penalty": 2.5, "frequency_penalty": -3, "logit_bias": {"5": -101}, "suffix": "x",
    "tools": [{"type": "function"}], "min_p": 1.5, "response_format": {"type": "xml"},
    "logprobs": 30, "top_logprobs": 3, "echo": "yes", "best_of": 0, "stream": "yes",
    "stream_options": {"include_usage": True}}


@st.composite
def breaker(draw, body: Body):
    """One mutation that makes the body invalid on its own."""
    f = body.fields
    kind = draw(st.sampled_from(["int", "float", "prompt", "method", "stop", "unsupported",
                                 "surrogate_key", "deep", "bytes", "size", "top"]))
    if kind == "int":
        name = draw(st.sampled_from(sorted(INT_FIELDS)))
        huge = huge_ints.filter(lambda v: name != "seed" or v >= 2**63 or v < 0)
        # (null is every field's default: a valid value)
        f[name] = draw(st.one_of(huge, st.sampled_from(INT_FIELDS[name]),
                                 wrong_types.filter(lambda v: v is not None)))
    elif kind == "float":
        name = draw(st.sampled_from(sorted(FLOAT_FIELDS)))
        f[name] = draw(st.one_of(st.sampled_from(FLOAT_FIELDS[name]),
                                 raw_numbers.map(body.raw),
                                 st.sampled_from([True, "0.7", [0.7]])))
    elif kind == "prompt":
        if body.path == "/v1/completions":
            f["prompt"] = draw(st.one_of(
                st.sampled_from(["", 5, None, {"text": "x"}, [["x"]], ["a", 5], [], ["x"] * 65]),
                surrogate.map(lambda s: "I really " + s)))
        else:
            first = f["messages"][0] if f["messages"] else None   # an earlier breaker's
            msg = dict(first) if isinstance(first, dict) else {"role": "user", "content": "x"}
            choice = draw(st.sampled_from(["role", "content", "empty", "surrogate", "type"]))
            if choice == "role":
                msg["role"] = draw(st.sampled_from(["wizard", "user: x\nassistant", "tool",
                                                    "", "USER", 1, None]))
            elif choice == "content":
                msg["content"] = draw(st.sampled_from([5, None, {"a": 1}, [1], [{"type": "image_url",
                                                                               "image_url": {}}]]))
            elif choice == "surrogate":
                msg["content"] = "hello " + draw(surrogate)
            elif choice == "type":
                msg = "just a string"
            f["messages"] = [] if choice == "empty" else [msg] + f["messages"][1:]
    elif kind == "method":
        f["method"] = draw(st.sampled_from(["magic", "CBS", "", 1, True, ["cbs"]]))
    elif kind == "stop":
        f["stop"] = draw(st.sampled_from([[1], [""], ["x"] * 17, ["y" * 257], {"a": "b"}, 3,
                                          ["\ud800"]]))
    elif kind == "unsupported":
        name = draw(st.sampled_from(sorted(UNSUPPORTED)))
        f[name] = UNSUPPORTED[name]
    elif kind == "surrogate_key":
        f["x_" + draw(surrogate)] = 1
    elif kind == "deep":
        depth = draw(st.sampled_from([33, 100, 5000, 100000]))
        f["x_deep"] = body.raw("[" * depth + "]" * depth)
    elif kind == "bytes":
        edit = draw(st.sampled_from(["cut", "latin1", "garbage", "empty"]))
        body.bytes_edit = {
            "cut": lambda d: d[:len(d) // 2],
            "latin1": lambda d: d[:-1] + b', "x_name": "caf\xe9"}',
            "garbage": lambda d: b"\xff\xfe" + d,
            "empty": lambda d: b""}[edit]
    elif kind == "size":
        # A body just past the limit (413), or a prompt near it (past the prompt limit: 400).
        size = draw(st.integers(BODY_LIMIT - 2000, BODY_LIMIT + 2000))
        key = "prompt" if body.path == "/v1/completions" else "x_pad"
        f[key] = "a" * size
        if key == "x_pad":
            f["w"] = 0   # a pad alone is valid: keep the body invalid when it fits the limit
    else:
        top = draw(st.sampled_from([b"[1, 2]", b'"prompt"', b"null", b"42", b"{"]))
        body.bytes_edit = lambda d: top
    return kind


@st.composite
def hostile(draw):
    path, base = draw(st.sampled_from(WELL_FORMED))
    body = Body(path, json.loads(json.dumps(base)))
    noise = draw(st.dictionaries(st.sampled_from(["user", "x_meta", "x_n", "metadata"]),
                                 st.one_of(st.integers(-10**6, 10**6), st.text(max_size=8),
                                           st.lists(st.integers(), max_size=3)), max_size=2))
    body.fields.update(noise)
    kinds = [draw(breaker(body)) for _ in range(draw(st.integers(1, 3)))]
    return body, kinds


# ---- the test ------------------------------------------------------------------------------------

def test_fuzzed_bodies_get_4xx_in_the_envelope_while_well_formed_requests_run_untouched(live):
    expected = []
    for path, body in WELL_FORMED:
        code, data = post(live.port, path, json.dumps(body).encode())
        assert code == 200, data
        expected.append(text_of(json.loads(data)))
    before = live.metrics()

    stop, answers = threading.Event(), []

    def well_formed():
        i = 0
        while not stop.is_set():
            path, body = WELL_FORMED[i % len(WELL_FORMED)]
            code, data = post(live.port, path, json.dumps(body).encode())
            answers.append((i % len(WELL_FORMED), code, data))
            i += 1
    workers = [threading.Thread(target=well_formed) for _ in range(2)]
    for t in workers:
        t.start()
    seen = {}
    try:
        @settings(max_examples=250, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(hostile())
        def send(case):
            body, kinds = case
            code, data = post(live.port, body.path, body.encode())
            assert 400 <= code < 500, (kinds, code, data[:300])
            error = json.loads(data)["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert isinstance(error["message"], str) and error["message"]
            assert error["type"] == "invalid_request_error" and error["code"] == code
            assert error["param"] is None or isinstance(error["param"], str)
            seen[code] = seen.get(code, 0) + 1
            sent.append(body)
        sent = []
        send()
        # Keep the hostile traffic up until the well-formed requests have run several times
        # beside it (the examples above can be over before a slow machine answers twice).
        i = 0
        while len(answers) < 2 * len(WELL_FORMED) and all(t.is_alive() for t in workers):
            body = sent[i % len(sent)]
            code, _ = post(live.port, body.path, body.encode())
            assert 400 <= code < 500, body
            seen[code] = seen.get(code, 0) + 1
            i += 1
    finally:
        stop.set()
        for t in workers:
            t.join(timeout=120)
    assert 413 in seen and 400 in seen
    assert len(answers) >= 2 * len(WELL_FORMED), "the well-formed requests ran alongside"
    for i, code, data in answers:
        assert code == 200, data[:300]
        assert text_of(json.loads(data)) == expected[i], WELL_FORMED[i]
    after = live.metrics()
    sent = sum(seen.values()) + len(answers)
    assert after["w2s_requests_total"] - before["w2s_requests_total"] == sent
    assert after["w2s_requests_failed_total"] == 0
    outcomes = sum(after[f"w2s_requests_{o}_total"]
                   for o in ("finished", "failed", "cancelled", "rejected"))
    assert outcomes == after["w2s_requests_total"] and after["w2s_requests_in_flight"] == 0
    assert after["w2s_requests_running"] == 0
    live.async_engine.engine.check_all_free()


# ---- the scorer's and the tokenizer's routes -------------------------------------------------------

TOOL_WELL_FORMED = [
    ("/v1/score", {"text_1": "I really", "text_2": [" a dog", " the man"]}),
    ("/v1/rerank", {"query": "This film", "documents": [" a dog", " a cat"], "top_n": 1}),
    ("/tokenize", {"prompt": "I really"}),
    ("/detokenize", {"tokens": [5, 6, 7]}),
]
TOOL_BREAKERS = {   # path -> (field, invalid values)
    "/v1/score": {"text_1": [5, None, [], [1], {"a": 1}, ["a", "b", "c"], "a\ud800"],
                  "text_2": [5, None, [], [None], ["x"] * 257, "\udfff"],
                  "finished": ["yes", 1, [True] * 5, [1, 0]],
                  "truncate_prompt_tokens": [5]},
    "/v1/rerank": {"query": [None, 5, ["x"], "\ud800"],
                   "documents": [[], "x", [5], ["x"] * 257, ["\udc00"]],
                   "top_n": [0, -1, "2", 2.5, True], "return_documents": ["no", 0],
                   "finished": [[True], "true"]},
    "/tokenize": {"prompt": [5, [1], "", "\ud800"], "messages": [[], "hi", [{"role": "x"}]],
                  "add_special_tokens": [False, "yes"], "return_token_strs": ["yes"],
                  "add_generation_prompt": [True, 1]},
    "/detokenize": {"tokens": [[-1], [300], [2**63], ["5"], [True], "5", None, [[5]]]},
}


@st.composite
def hostile_tool_body(draw):
    path, base = draw(st.sampled_from(TOOL_WELL_FORMED))
    body = Body(path, json.loads(json.dumps(base)))
    kind = draw(st.sampled_from(["field", "field", "deep", "bytes", "size", "top"]))
    if kind == "field":
        name = draw(st.sampled_from(sorted(TOOL_BREAKERS[path])))
        body.fields[name] = draw(st.sampled_from(TOOL_BREAKERS[path][name]))
    elif kind == "deep":
        depth = draw(st.sampled_from([33, 5000]))
        body.fields["x_deep"] = body.raw("[" * depth + "]" * depth)
    elif kind == "bytes":
        body.bytes_edit = draw(st.sampled_from([lambda d: d[:len(d) // 2],
                                                lambda d: b"\xff\xfe" + d, lambda d: b""]))
    elif kind == "size":
        body.fields["x_pad"] = "a" * (BODY_LIMIT + 10)
    else:
        body.bytes_edit = lambda d: b"[1, 2]"
    return body, kind


def test_fuzzed_score_rerank_and_tokenize_bodies_get_4xx_while_good_ones_answer_the_same(live):
    expected = {}
    for path, body in TOOL_WELL_FORMED:
        code, data = post(live.port, path, json.dumps(body).encode())
        assert code == 200, data
        expected[path] = json.loads(data)

    stop, answers = threading.Event(), []

    def well_formed():
        i = 0
        while not stop.is_set():
            path, body = TOOL_WELL_FORMED[i % len(TOOL_WELL_FORMED)]
            code, data = post(live.port, path, json.dumps(body).encode())
            answers.append((path, code, data))
            i += 1
    worker = threading.Thread(target=well_formed)
    worker.start()
    try:
        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(hostile_tool_body())
        def send(case):
            body, kind = case
            code, data = post(live.port, body.path, body.encode())
            assert 400 <= code < 500, (kind, body, code, data[:300])
            error = json.loads(data)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        send()
    finally:
        stop.set()
        worker.join(timeout=120)
    assert answers
    for path, code, data in answers:
        assert code == 200, data[:300]
        got, want = json.loads(data), expected[path]
        if path == "/v1/score":
            assert [d["score"] for d in got["data"]] == pytest.approx(
                [d["score"] for d in want["data"]], abs=1e-5)
        elif path == "/v1/rerank":
            assert [r["index"] for r in got["results"]] == [r["index"] for r in want["results"]]
        else:
            assert got == want
    live.async_engine.engine.check_all_free()
