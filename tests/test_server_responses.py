"""OpenAI's Responses API (POST /v1/responses) through the stock openai client: the chat
endpoint's search answered as a Response object, or as the Responses API's stream events."""

import json

import openai
import pytest
from live_server import LiveServer
from test_server import is_envelope, raw_post, tiny_engine

SEARCH = {"seed": 3, "w": 2, "k": 2, "l": 3}


@pytest.fixture(scope="module")
def server():
    live = LiveServer(tiny_engine())
    yield live
    live.stop()


def test_a_response_is_the_chat_completion_of_the_same_messages(server):
    """instructions are a system message, input the messages (a string: one user message),
    max_output_tokens the token limit: the text, the usage and the cut are the chat
    endpoint's for those messages."""
    for tokens in (4, 40):
        r = server.client.responses.create(model="tiny", instructions="Be kind.",
                                           input="I really", max_output_tokens=tokens,
                                           extra_body=SEARCH)
        chat = server.client.chat.completions.create(
            model="tiny", max_completion_tokens=tokens, extra_body=SEARCH,
            messages=[{"role": "system", "content": "Be kind."},
                      {"role": "user", "content": "I really"}])
        choice = chat.choices[0]
        assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
        assert r.output_text == choice.message.content
        assert r.output[0].role == "assistant" and r.output[0].content[0].type == "output_text"
        assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (
            chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens)
        cut = choice.finish_reason == "length"
        assert r.status == ("incomplete" if cut else "completed")
        assert (r.incomplete_details.reason if cut else r.incomplete_details) == (
            "max_output_tokens" if cut else None)
        assert r.model_extra["w2s"]["reward"] == pytest.approx(chat.model_extra["w2s"]["reward"])
    server.async_engine.engine.check_all_free()


def test_input_messages_with_content_parts_read_as_the_chat_messages(server):
    r = server.client.responses.create(
        model="tiny", max_output_tokens=6, extra_body=SEARCH,
        input=[{"role": "developer", "content": "Short answers."},
               {"role": "user", "content": [{"type": "input_text", "text": "What a"}]},
               {"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": " film."}]},
               {"role": "user", "content": "And the plot?"}])
    chat = server.client.chat.completions.create(
        model="tiny", max_completion_tokens=6, extra_body=SEARCH,
        messages=[{"role": "developer", "content": "Short answers."},
                  {"role": "user", "content": "What a"},
                  {"role": "assistant", "content": " film."},
                  {"role": "user", "content": "And the plot?"}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_a_streamed_response_sends_the_responses_events_in_order_and_the_same_text(server):
    whole = server.client.responses.create(model="tiny", input="This film",
                                           max_output_tokens=12, extra_body=SEARCH)
    events = list(server.client.responses.create(model="tiny", input="This film",
                                                 max_output_tokens=12, stream=True,
                                                 extra_body=SEARCH))
    kinds = [e.type for e in events]
    last = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", last]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == events[-4].text == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    server.async_engine.engine.check_all_free()


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "store": True}, "store"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"input": "x", "reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": "x", "n": 2}, "n"),
    ({"input": "x", "max_tokens": 5}, "max_tokens"),
    ({"input": []}, "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x" * 10**6}, "input"),
])
def test_what_the_responses_api_cannot_do_here_is_refused_naming_its_field(server, body, param):
    code, payload = raw_post(server.port, "/v1/responses", json.dumps(body).encode())
    assert code == 400 and is_envelope(payload, 400), payload
    assert payload["error"]["param"] == param, payload


def test_the_client_reads_a_refusal_as_its_bad_request_error(server):
    with pytest.raises(openai.BadRequestError, match="store: not supported"):
        server.client.responses.create(model="tiny", input="x", store=True)
    # store=false and the settings that change nothing here are taken
    r = server.client.responses.create(model="tiny", input="I really", store=False,
                                       max_output_tokens=3, tool_choice="auto",
                                       truncation="disabled", prompt_cache_key="k",
                                       metadata={"run": "7"}, extra_body=SEARCH)
    assert r.metadata == {"run": "7"} and r.store is False


def test_a_failed_streamed_response_holds_only_what_openai_types_allow(server):
    """A search that fails part-way (here: a guided choice no allowed token can start, which
    fails at its first token): an error event, then response.failed whose message item has
    one of a message's statuses (in_progress, completed, incomplete; 'failed' is a
    response's)."""
    events = list(server.client.responses.create(
        model="tiny", input="x", max_output_tokens=4, stream=True,
        extra_body={"method": "base", "guided_choice": ["yes"], "allowed_token_ids": [5]}))
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    for item in failed.output:
        assert item.status in ("in_progress", "completed", "incomplete"), item
    server.async_engine.engine.check_all_free()
