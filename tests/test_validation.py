"""Strict validation at the boundary, and errors that stay with the request that caused them.

SearchParams.validate refuses every value the step cannot run; the Engine refuses prompts,
messages and token ids of the wrong type or range with messages that say what was expected;
an error inside a step fails only the requests it touched, and every block comes back; the
queue bound counts the requests waiting for memory; model specs that cannot load fail fast.
"""

import asyncio
import json
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from test_server import tiny_engine
from tiny_models import make_tokenizer, tiny_llama
from w2s_engine import Engine, SearchError, SearchParams
from w2s_engine.models.loader import ModelLoadError, load_model
from w2s_engine.one_thread import EngineBusy
from w2s_engine.params import InvalidParam
from w2s_engine.search.request import RequestStatus
from w2s_engine.serve.async_engine import AsyncEngine

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("changes, field", [
    ({"top_k": 3_000_000_000}, "top_k"), ({"top_k": -1}, "top_k"), ({"top_k": 5.0}, "top_k"),
    ({"temperature": INF}, "temperature"), ({"temperature": NAN}, "temperature"),
    ({"temperature": 1e308}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": True}, "temperature"), ({"temperature": "0.7"}, "temperature"),
    ({"top_p": NAN}, "top_p"), ({"top_p": 0.0}, "top_p"), ({"top_p": True}, "top_p"),
    ({"method": "eft", "w": 1, "k": 1, "l": None, "beta": NAN}, "beta"),
    ({"method": "eft", "w": 1, "k": 1, "l": None, "beta": 1e308}, "beta"),
    ({"w": True}, "w"), ({"k": 2**40}, "k"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"l": False}, "l"), ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"),
    ({"seed": True}, "seed"), ({"seed": 1.0}, "seed"),
    ({"stop": ["x"] * 17}, "stop"), ({"stop": ["x" * 257]}, "stop"), ({"stop": [""]}, "stop"),
    ({"stop": [3]}, "stop"), ({"stop": ["\ud800"]}, "stop"), ({"method": ["cbs"]}, "method"),
    ({"ignore_eos": 1}, "ignore_eos"),
])
def test_validate_refuses_every_value_the_step_cannot_run_and_names_it(changes, field):
    with pytest.raises(InvalidParam) as e:
        SearchParams(**changes).validate()
    assert e.value.field == field and field in str(e.value) and e.value.why in str(e.value)


def test_validate_accepts_the_edges_and_normalizes():
    p = SearchParams(temperature=0, top_k=2**31 - 1, top_p=1, seed=2**63 - 1, stop="END",
                     beta=-100)
    p.validate()
    assert p.stop == ["END"] and isinstance(p.temperature, float) and isinstance(p.top_p, float)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(num_kv_blocks=800)


def poison(monkeypatch, owner, name: str, error: Exception):
    """owner.name(request, ...) raises `error` for the request whose prompt is 'POISON'."""
    real = getattr(owner, name)

    def patched(r, *args):
        if r.prompt == "POISON":
            raise error
        return real(r, *args)
    monkeypatch.setattr(owner, name, patched)


FAST = SearchParams(w=2, k=2, l=3, max_new_tokens=6, seed=7)


def test_a_top_k_past_the_vocabulary_is_clamped_and_samples_like_no_top_k(engine):
    req = engine.make_request("I really", FAST.copy(top_k=2**31 - 1))
    assert req.params.top_k == engine.runners["large"].shape.vocab_size
    huge, off = engine.search(["I really"], FAST.copy(top_k=10**6))[0], \
        engine.search(["I really"], FAST.copy(top_k=0))[0]
    # (the reward to rounding: the second reads the prompt the first left in the prefix cache)
    assert huge.text == off.text and huge.reward == pytest.approx(off.reward, abs=1e-5)
    engine.check_all_free()


@pytest.mark.parametrize("prompt, error, says", [
    (5, TypeError, "expected a str, or chat messages"),
    (b"bytes", TypeError, "expected a str"),
    ("", ValueError, "non-empty"),
    ("bad \ud800 text", ValueError, "lone UTF-16 surrogate"),
    ([], ValueError, "at least one message"),
    (["hi"], TypeError, "messages.0: expected a dict"),
    ([{"role": "wizard", "content": "x"}], ValueError, "messages.0.role='wizard'"),
    ([{"role": "user: x\nassistant", "content": "x"}], ValueError, "must be one of"),
    ([{"role": "tool", "content": "x"}], ValueError, "tool messages need chat=True"),
    ([{"role": "user", "content": 5}], TypeError, "messages.0.content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], ValueError,
     "only text parts"),
])
def test_prompts_of_the_wrong_type_or_value_say_what_was_expected(engine, prompt, error, says):
    with pytest.raises(error, match="prompt 0: .*" + says.replace("(", r"\(")):
        engine.search([prompt], FAST)
    engine.check_all_free()


def test_chat_over_a_model_with_no_chat_template_is_refused_at_start_naming_it():
    tok = make_tokenizer(300)
    assert not tok.chat_template
    with pytest.raises(ValueError, match="the large model .* has none: leave chat off.*"
                                         "--large-template without --chat"):
        Engine((tiny_llama(len(tok), seed=1), tok), chat=True, num_kv_blocks=50,
               progress=False)


def test_messages_take_text_parts_joined_by_newlines(engine):
    parts = [{"role": "user", "content": [{"type": "text", "text": "I really"},
                                          {"type": "text", "text": "liked it"}]}]
    plain = [{"role": "user", "content": "I really\nliked it"}]
    a, b = engine.make_request(parts, FAST), engine.make_request(plain, FAST)
    assert a.large_prompt_ids == b.large_prompt_ids


PREFILLED = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Sure, it"}]


def test_continue_final_message_leaves_the_assistants_text_open_in_every_models_prompt(engine):
    from w2s_engine.search.prompts import ResponseTemplate
    # a plain transcript (no chat templates): the assistant's line, not a new one
    r = engine.make_request(PREFILLED, FAST, continue_final_message=True)
    assert r.large_prompt_text.endswith("user: hello\nassistant: Sure, it")
    assert all(sp.text.endswith("assistant: Sure, it") for sp in r.small_prompts)
    opened = engine.make_request(PREFILLED, FAST)
    assert opened.large_prompt_text.endswith("assistant: Sure, it\nassistant:")
    # chat templates: transformers' continue_final_message, the large and the small models'
    tok = make_tokenizer(300)
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    chat = Engine((tiny_llama(len(tok), seed=1), tok), (tiny_llama(len(tok), seed=2), tok),
                  (tiny_llama(len(tok), seed=3), tok), chat=True, num_kv_blocks=200,
                  progress=False)
    r = chat.make_request(PREFILLED, FAST, continue_final_message=True)
    rendered = tok.apply_chat_template(PREFILLED, tokenize=False, continue_final_message=True)
    assert r.large_prompt_text == rendered and rendered.endswith("<bos>assistant: Sure, it")
    assert all(sp.text == rendered for sp in r.small_prompts)
    # a reward model's chat rendering: the response goes on inside the assistant's message
    before, after = ResponseTemplate("chat").around(tok, PREFILLED, continue_final=True)
    assert (before, after) == (rendered, "\n")
    # what it needs
    for prompt in ("hello", PREFILLED[:1]):
        with pytest.raises(InvalidParam, match="needs chat messages whose last is the "
                                               "assistant's"):
            engine.make_request(prompt, FAST, continue_final_message=True)


def test_search_and_score_refuse_wrong_types_and_token_ids_past_the_vocabulary(engine):
    with pytest.raises(TypeError, match="prompts: expected a str or a list"):
        engine.search(5, FAST)
    with pytest.raises(TypeError, match="params: expected a SearchParams"):
        engine.make_request("x", {"w": 2})
    with pytest.raises(ValueError, match=r"responses\[0\]: token id 1000000000 is outside"):
        engine.score(["I really"], [[5, 10**9]])
    with pytest.raises(ValueError, match="token id -1"):
        engine.score(["I really"], [[-1]])
    with pytest.raises(TypeError, match=r"responses\[0\]: expected a text or a list of int"):
        engine.score(["I really"], [[5, True]])
    with pytest.raises(TypeError, match=r"responses\[0\]"):
        engine.score(["I really"], [5])
    with pytest.raises(TypeError, match="expected one prompt and one response"):
        engine.score(5, [" liked"])
    with pytest.raises(TypeError, match="finished"):
        engine.score(["I really"], [" liked"], finished=[None])
    assert isinstance(engine.score(["I really"], [[5, 6]])[0], float)
    engine.check_all_free()


def test_make_request_from_many_threads_tokenizes_as_one_thread_does(engine):
    prompts = [f"Review {i}: the plot of this film " * (1 + i % 7) for i in range(24)]
    serial = [engine.make_request(p, FAST).large_prompt_ids for p in prompts]
    out, errors = [None] * len(prompts), []

    def prepare(i):
        try:
            out[i] = engine.make_request(prompts[i], FAST).large_prompt_ids
        except Exception as e:  # "Already borrowed" would land here
            errors.append(e)
    threads = [threading.Thread(target=prepare, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and out == serial


def _alone(engine, prompt):
    return engine.search([prompt], FAST)[0]


def test_a_prefill_that_fails_is_retried_per_request_and_only_the_culprit_fails(engine,
                                                                                monkeypatch):
    expected = {p: _alone(engine, p).text for p in ("I really", "This film")}
    real = engine.large.prefill

    def prefill(requests, max_tokens):
        if any(r.prompt == "POISON" for r in requests):
            raise RuntimeError("a prompt this kernel cannot take")
        return real(requests, max_tokens)
    monkeypatch.setattr(engine.large, "prefill", prefill)
    reqs = [engine.add_request(p, FAST) for p in ("I really", "POISON", "This film")]
    while engine.has_unfinished():
        engine.step()
    assert [r.status for r in reqs] == [RequestStatus.DONE, RequestStatus.FAILED,
                                        RequestStatus.DONE]
    assert "engine error in prefill: RuntimeError" in reqs[1].error
    assert [reqs[0].result.text, reqs[2].result.text] == [expected["I really"],
                                                          expected["This film"]]
    engine.check_all_free()


def test_an_error_in_one_requests_selection_fails_it_alone(engine, monkeypatch):
    from w2s_engine.search.request import SearchRequest
    expected = _alone(engine, "This film").text
    poison(monkeypatch, SearchRequest, "select", IndexError("selection bug"))
    with pytest.raises(SearchError, match="prompt 0 failed: engine error in selection: "
                                          "IndexError"):
        engine.search(["POISON", "This film"], FAST)
    ok = engine.add_request("This film", FAST)
    while engine.has_unfinished():
        engine.step()
    assert ok.result.text == expected
    engine.check_all_free()


def test_a_failed_decode_step_fails_the_running_requests_and_the_engine_goes_on(engine,
                                                                               monkeypatch):
    real, calls = engine.large.advance, []

    def advance(requests):
        calls.append(len(requests))
        if len(calls) == 2:
            raise RuntimeError("device error")
        return real(requests)
    monkeypatch.setattr(engine.large, "advance", advance)
    running = engine.add_request("I really", FAST)
    engine.step()
    engine.step()   # fails
    assert running.status is RequestStatus.FAILED and "device error" in running.error
    engine.check_all_free()
    monkeypatch.setattr(engine.large, "advance", real)
    assert engine.search(["I really"], FAST)[0].text == _alone(engine, "I really").text
    engine.check_all_free()


def test_a_decode_batch_that_fails_for_one_request_is_run_again_alone_and_only_it_fails(
        engine, monkeypatch):
    expected = {p: _alone(engine, p).text for p in ("I really", "This film")}
    real = engine.large.runner.decode_logits
    reqs = [engine.add_request(p, FAST) for p in ("I really", "POISON", "This film")]

    def decode_logits(items, words, tokens_from=None, requests=None):
        if any(table is b.large for table, _ in items for b in reqs[1].beams):
            raise RuntimeError("a row this kernel cannot take")
        return real(items, words, tokens_from, requests)
    monkeypatch.setattr(engine.large.runner, "decode_logits", decode_logits)
    while engine.has_unfinished():
        engine.step()
    assert [r.status for r in reqs] == [RequestStatus.DONE, RequestStatus.FAILED,
                                        RequestStatus.DONE]
    assert "engine error in the large model's step: RuntimeError" in reqs[1].error
    assert [reqs[0].result.text, reqs[2].result.text] == [expected["I really"],
                                                          expected["This film"]]
    engine.check_all_free()


def test_a_decode_batch_too_large_for_the_device_runs_each_request_alone_and_all_finish(
        engine, monkeypatch):
    prompts = ["I really", "This film", "What a"]
    expected = [_alone(engine, p) for p in prompts]
    real = engine.large.runner.decode_logits
    rows = FAST.w * FAST.k

    def decode_logits(items, words, tokens_from=None, requests=None):
        if len(items) > rows:   # as a CUDA out-of-memory error on a batch past one request
            raise RuntimeError("CUDA out of memory")
        return real(items, words, tokens_from, requests)
    monkeypatch.setattr(engine.large.runner, "decode_logits", decode_logits)
    results = engine.search(prompts, FAST)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert [r.reward for r in results] == pytest.approx([r.reward for r in expected], abs=1e-5)
    engine.check_all_free()


def test_an_error_recording_one_requests_token_fails_it_alone(engine, monkeypatch):
    from w2s_engine.search.request import SearchRequest
    expected = _alone(engine, "This film").text
    real = SearchRequest.record_token

    def record_token(self, *args):
        if self.prompt == "POISON":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a tokenizer that cannot decode")
        return real(self, *args)
    monkeypatch.setattr(SearchRequest, "record_token", record_token)
    reqs = [engine.add_request(p, FAST) for p in ("POISON", "This film")]
    while engine.has_unfinished():
        engine.step()
    assert reqs[0].status is RequestStatus.FAILED
    assert "UnicodeDecodeError while recording a token" in reqs[0].error
    assert reqs[1].result.text == expected
    engine.check_all_free()


def test_the_queue_bound_counts_requests_waiting_for_memory_not_a_burst_that_fits():
    engine = tiny_engine(max_waiting=2)
    tok = make_tokenizer(300)
    burst = [engine.add_request(f"Review {i}:", FAST) for i in range(32)]   # all fit: no 429
    assert len(engine.scheduler.waiting) == 32
    while engine.has_unfinished():
        engine.step()
    assert all(r.status is RequestStatus.DONE for r in burst)
    # A pool that holds one such search at a time: one runs, two wait, the next is refused.
    small = Engine((tiny_llama(len(tok), seed=1, layers=3), tok), num_kv_blocks=60,
                   block_size=4, progress=False, max_waiting=2)
    big = SearchParams.base(n=4, max_new_tokens=40, seed=1)
    reqs = [small.add_request("I really", big) for _ in range(3)]
    from w2s_engine.scheduler import QueueFull
    with pytest.raises(QueueFull, match="2 requests are waiting for KV memory"):
        small.add_request("I really", big)
    while small.has_unfinished():
        small.step()
    assert all(r.status is RequestStatus.DONE for r in reqs)
    small.check_all_free()


def test_a_request_is_queued_once_and_a_refused_one_takes_no_search_id():
    from w2s_engine.scheduler import QueueFull
    tok = make_tokenizer(300)
    small = Engine((tiny_llama(len(tok), seed=1, layers=3), tok), num_kv_blocks=60,
                   block_size=4, progress=False, max_waiting=0)
    big = SearchParams.base(n=4, max_new_tokens=40, seed=1)
    first = small.add_request("I really", big)
    refused = small.make_request("This film", big)
    with pytest.raises(QueueFull):
        small.enqueue(refused)
    assert refused.request_id == -1
    with pytest.raises(ValueError, match="queued before .*make a new one with make_request"):
        small.enqueue(first)                     # already waiting
    while small.has_unfinished():
        small.step()
    with pytest.raises(ValueError, match="queued before"):
        small.enqueue(first)                     # ended
    second = small.add_request("This film", big)
    assert second.request_id not in (-1, first.request_id)
    while small.has_unfinished():
        small.step()
    assert first.status is second.status is RequestStatus.DONE
    small.check_all_free()


def test_cancel_of_something_not_a_request_is_refused_not_ignored(engine):
    with pytest.raises(TypeError, match="expected the SearchRequest that add_request"):
        engine.cancel(None)


def test_search_of_more_prompts_than_the_queue_bound_runs_them_all_as_room_comes():
    # A pool that holds one such search at a time and a queue of one: search() still runs
    # all five, taking them in as the queue has room, and leaves nothing behind.
    tok = make_tokenizer(300)
    small = Engine((tiny_llama(len(tok), seed=1, layers=3), tok), num_kv_blocks=60,
                   block_size=4, progress=False, max_waiting=1)
    params = SearchParams.base(n=4, max_new_tokens=40, seed=1)
    prompts = ["I really", "This film", "What a", "Hmm", "Yes"]
    results = small.search(prompts, params)
    assert [r.prompt for r in results] == prompts
    assert results[1].token_ids == small.search(["This film"], params)[0].token_ids
    assert not small.has_unfinished()
    small.check_all_free()


def test_search_takes_one_conversation_as_one_prompt(engine):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    one, = engine.search(messages, FAST)
    assert one.token_ids == engine.search([messages], FAST)[0].token_ids


def test_score_refuses_a_response_past_the_small_models_context(engine):
    limit = engine.scorer.streams[0].runners["tuned"].shape.max_positions
    with pytest.raises(ValueError, match=f"context is {limit}: shorten them"):
        engine.score(["I really"], [[5] * (limit + 10)])
    engine.check_all_free()


@pytest.mark.parametrize("setting, error, says", [
    ({"num_kv_blocks": 0}, ValueError, "num_kv_blocks=0"),
    ({"num_kv_blocks": -5}, ValueError, "num_kv_blocks=-5"),
    ({"num_kv_blocks": 2.5}, TypeError, "num_kv_blocks=2.5: give an int"),
    ({"block_size": "16"}, TypeError, "block_size='16': give an int"),
    ({"max_waiting": -1}, ValueError, "max_waiting=-1"),
    ({"device": "foo"}, ValueError, "device='foo'"),
    ({"device": "cuda"}, ValueError, "sees no CUDA device"),
    ({"dtype": "float8"}, ValueError, "dtype='float8'"),
    ({"dtype": torch.int32}, ValueError, "torch.float32, torch.float16 or torch.bfloat16"),
    ({"progress": "no"}, TypeError, "progress='no': give True or False"),
    ({"templates": ["{prompt}"]}, TypeError, "templates: expected a dict"),
    ({"config": {"num_kv_blocks": 50}}, TypeError,
     "config: expected an EngineConfig, got dict; or pass its fields as keywords"),
])
def test_engine_settings_are_checked_before_any_model_loads(setting, error, says, monkeypatch):
    if setting.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    loads = []
    monkeypatch.setattr("w2s_engine.engine.load_role", lambda *a, **k: loads.append(a))
    with pytest.raises(error, match=re.escape(says)):
        Engine("any-model", **setting)
    assert loads == []


def test_a_model_given_in_the_wrong_shape_is_refused_naming_what_came_and_what_to_pass():
    tok = make_tokenizer(300)
    model = tiny_llama(len(tok), seed=1)
    for large, says in [
            (model, "large: got a MistralForCausalLM (a model alone has no tokenizer); pass a "
                    "model spec string"),
            ((tok, model), "large: got (tokenizer, model); pass (model, tokenizer)"),
            ((model, "tok"), "large: got (a MistralForCausalLM, a str); pass (model, tokenizer)"),
            ((model, tok, 3), "large: got (a MistralForCausalLM, a "),   # (tokenizer), an int
            (None, "large: got None; pass a model spec string")]:
        with pytest.raises(TypeError) as e:
            Engine(large, num_kv_blocks=50, progress=False)
        assert str(e.value).startswith(says) and len(str(e.value)) < 300   # no model repr
    with pytest.raises(TypeError, match="tuned: got"):
        Engine((model, tok), model, (tiny_llama(len(tok), seed=2), tok), num_kv_blocks=50,
               progress=False)


def test_engine_keywords_override_a_given_config_and_dtype_names_are_taken():
    from w2s_engine.config import EngineConfig
    tok = make_tokenizer(300)
    engine = Engine((tiny_llama(len(tok), seed=1, layers=3), tok), progress=False,
                    config=EngineConfig(block_size=16, num_kv_blocks=100), block_size=4,
                    num_kv_blocks=7, dtype="float32")
    assert (engine.config.block_size, engine.budget.num_blocks) == (4, 7)
    assert engine.config.dtype == torch.float32


def test_async_scheduling_and_cascade_attention_are_on_with_cuda_unless_turned_off(monkeypatch):
    from w2s_engine.config import EngineConfig
    cpu = EngineConfig(device="cpu").resolve()
    assert (cpu.async_scheduling, cpu.cascade_attention) == (False, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # resolve() asks only this
    gpu = EngineConfig(device="cuda").resolve()
    assert (gpu.cuda_graphs, gpu.async_scheduling, gpu.cascade_attention) == (True, True, True)
    eager = EngineConfig(device="cuda", cuda_graphs=False).resolve()   # no static path
    assert (eager.async_scheduling, eager.cascade_attention) == (True, False)
    off = EngineConfig(device="cuda", async_scheduling=False, cascade_attention=False).resolve()
    assert (off.async_scheduling, off.cascade_attention) == (False, False)


def test_an_uncached_hub_id_fails_at_once_offline_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(ModelLoadError, match="'no-such-org/no-such-model' is not in the Hugging "
                                             "Face cache and HF_HUB_OFFLINE is set"):
        load_model("no-such-org/no-such-model")
    assert time.time() - start < 5


def _adapter_config(path, base):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(base), "peft_type": "LORA"}))


def test_an_adapter_whose_base_chain_loops_fails_clearly_and_the_cli_prints_one_line(tmp_path):
    _adapter_config(tmp_path / "a", tmp_path / "a")        # its own base
    with pytest.raises(ModelLoadError, match="chain of base models loops"):
        load_model(str(tmp_path / "a"))
    _adapter_config(tmp_path / "b", tmp_path / "c")        # b -> c -> b
    _adapter_config(tmp_path / "c", tmp_path / "b")
    with pytest.raises(ModelLoadError, match=r"loops \('.*b' -> '.*c' -> '.*b'\)"):
        load_model(str(tmp_path / "b"))
    out = subprocess.run([sys.executable, "-m", "w2s_engine.cli", "search", "x", "--method",
                          "base", "--large", str(tmp_path / "a")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [ln for ln in out.stderr.splitlines() if ln.startswith("w2s")] == [
        ln for ln in out.stderr.splitlines() if "loops" in ln]


def test_a_search_from_a_second_thread_while_one_runs_is_refused_and_the_first_finishes(engine):
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=9, seed=3)
    alone = engine.search("I really", params)[0]
    stream = engine.search_stream("I really", params)
    deltas = [next(stream)]                  # the stream's search is running on this thread
    refused = []

    def other():
        for call in (lambda: engine.search("This film", params), engine.step,
                     lambda: engine.score(["This film"], [" is good"])):
            try:
                call()
            except EngineBusy as e:
                refused.append(str(e))
    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(refused) == 3 and all("AsyncEngine" in m and "one thread" in m for m in refused)
    deltas += list(stream)
    assert deltas[-1].result.text == alone.text
    assert deltas[-1].result.reward == pytest.approx(alone.reward)
    engine.check_all_free()
    assert engine.search("This film", params)[0].text     # this thread again: fine
    result = []
    thread = threading.Thread(target=lambda: result.append(engine.search("I really", params)))
    thread.start()
    thread.join()
    assert result[0][0].text == alone.text    # and from another once the first is done


def test_an_engine_an_async_engine_drives_refuses_other_callers_until_it_shuts_down():
    engine = tiny_engine(num_kv_blocks=400)
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=9, seed=3)
    async_engine = AsyncEngine(engine)
    try:
        with pytest.raises(EngineBusy, match="an AsyncEngine on thread 'w2s-engine-loop'"):
            engine.search("I really", params)
        with pytest.raises(EngineBusy):
            AsyncEngine(engine)
        served = asyncio.run(async_engine.search("I really", params))
    finally:
        async_engine.shutdown()
    assert engine.search("I really", params)[0].text == served.text   # the caller's again
    engine.check_all_free()


def test_search_refuses_bad_params_once_as_the_invalid_param_that_names_the_field(engine):
    with pytest.raises(InvalidParam) as e:
        engine.search(["I really", "This film"], FAST.copy(top_k=-1))
    assert e.value.field == "top_k" and str(e.value).startswith("SearchParams.top_k=-1")
    with pytest.raises(InvalidParam) as e:   # a prompt's own error keeps its field, named
        engine.search(["I really", [{"role": "wizard", "content": "x"}]], FAST)
    assert e.value.field == "messages.0.role"
    assert str(e.value).startswith("prompt 1: messages.0.role='wizard'")
    engine.check_all_free()
