"""The small pair's scoring under real chat templates (written into tiny tokenizers): a
response's tokens as apply_chat_template renders them in the assistant's turn, and the end of
turn the template writes after them."""

import logging

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams

# google/gemma-3-*-it's tokenizer_config.json chat_template (text parts left out)
GEMMA3 = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {{- message['content'] | trim -}}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")
# Qwen/Qwen3-*'s, its assistant and generation-prompt parts (no tools)
QWEN3 = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if message.role == 'user' and ns.last_query_index == messages|length - 1 %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
# HuggingFaceTB/SmolLM2-*-Instruct's (ChatML)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

USER = [{"role": "user", "content": "Review a film."}]


def chat_tokenizer(template: str, bos: str | None, eos: str, specials: list[str]):
    """The tiny BPE tokenizer with a family's special tokens, BOS (added by the tokenizer, as
    Gemma's is) and EOS, and its chat template."""
    backend = make_tokenizer(300)._tokenizer
    backend.add_special_tokens([t for t in (bos, eos) if t] + specials)
    backend.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]) if bos else None
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos,
                                  **({"bos_token": bos} if bos else {}))
    tok.chat_template = template
    return tok


def chat_engine(tok):
    untuned = tiny_llama(len(tok), seed=2)
    pair = (tuned_from(untuned, seed=3, scale=0.3), untuned)
    engine = Engine((tiny_llama(len(tok), seed=1), tok), (clone(pair[0]), tok),
                    (clone(pair[1]), tok), chat=True, block_size=4, num_kv_blocks=300,
                    progress=False)
    return engine, pair


def rendered_reward(pair, tok, messages, response: str, finished: bool, **render) -> float:
    """From scratch: the response's tokens as they sit in apply_chat_template(messages + the
    assistant's reply), and, finished, the first token the template writes after it."""
    mark = "\u2063R\u2063"
    cont = render.pop("continue_final_message", False)
    last = ([dict(messages[-1], content=messages[-1]["content"] + mark)] if cont
            else [{"role": "assistant", "content": mark}])
    head = messages[:-1] if cont else messages
    before, after = tok.apply_chat_template(head + last, tokenize=False, **render).split(mark)
    prompt = tok(before, add_special_tokens=False)["input_ids"]
    full = tok(before + response, add_special_tokens=False)["input_ids"]
    assert full[:len(prompt)] == prompt
    if finished:
        full += tok(after, add_special_tokens=False)["input_ids"][:1]
    total = 0.0
    for model, sign in zip(pair, (1.0, -1.0)):
        with torch.no_grad():
            logp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
        total += sign * sum(logp[i - 1, full[i]].item() for i in range(len(prompt), len(full)))
    return total


def test_a_finished_chat_response_scores_the_templates_end_of_turn_not_the_eos_token():
    """Gemma's eos_token is <eos>, its turn ends with <end_of_turn>: score() (and a search
    across vocabularies) scores the latter, as apply_chat_template renders the reply."""
    tok = chat_tokenizer(GEMMA3, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"])
    engine, pair = chat_engine(tok)
    system = [{"role": "system", "content": "Be brief."}] + USER
    for messages in (USER, system):
        for finished in (True, False):
            want = rendered_reward(pair, tok, messages, "The film was great.", finished)
            got = engine.score([messages], ["The film was great."], finished=finished)[0]
            assert got == pytest.approx(want, abs=1e-4), (messages, finished)
    # the large model's prompt: the template's BOS once (not the tokenizer's again)
    ids = engine.make_request(USER, SearchParams(max_new_tokens=4)).large_prompt_ids
    assert list(ids) == tok.apply_chat_template(USER, add_generation_prompt=True)["input_ids"]
    assert list(ids).count(tok.bos_token_id) == 1


def test_score_takes_continue_final_message_and_chat_template_kwargs_as_search_does():
    """A prefilled assistant message is continued, not followed by a new turn, and Qwen3's
    enable_thinking renders the prompt as the search did: score() gives a hypothesis's
    reward."""
    tok = chat_tokenizer(QWEN3, None, "<|im_end|>", ["<|im_start|>", "<think>", "</think>"])
    engine, pair = chat_engine(tok)
    prefill = USER + [{"role": "assistant", "content": "The plot"}]
    for messages, how in ((prefill, {"continue_final_message": True}),
                          (USER, {"chat_template_kwargs": {"enable_thinking": False}})):
        res = engine.search([messages], SearchParams(w=2, k=2, l=3, max_new_tokens=6, seed=3),
                            **how)[0]
        for h in res.hypotheses:
            got = engine.score([messages], [h.small_token_ids], finished=h.finished, **how)[0]
            assert got == pytest.approx(h.reward, abs=1e-4)
        render = {"continue_final_message": True} if "continue_final_message" in how \
            else how["chat_template_kwargs"]
        want = rendered_reward(pair, tok, messages, " was fun.", True, **render)
        assert engine.score([messages], [" was fun."], **how)[0] == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="continue_final_message: continuing the last message"):
        engine.score([USER], ["x"], continue_final_message=True)


def test_a_chat_template_whose_reply_turn_differs_from_its_generation_prompt_is_warned(caplog):
    """Qwen3's puts an empty reasoning block before a last reply, not after its generation
    prompt: the small models score after the generation prompt, and say so at load."""
    with caplog.at_level(logging.WARNING, logger="w2s_engine"):
        chat_engine(chat_tokenizer(CHATML, None, "<|im_end|>", ["<|im_start|>"]))
    assert "opens the assistant's turn" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="w2s_engine"):
        chat_engine(chat_tokenizer(QWEN3, None, "<|im_end|>",
                                   ["<|im_start|>", "<think>", "</think>"]))
    assert "the tuned model" in caplog.text and "<think>\\n\\n</think>" in caplog.text
    assert "enable_thinking': False" in caplog.text


@pytest.mark.parametrize("method", ["cbs", "eft"])
@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_end_scores_the_templates_end_of_turn_with_one_vocabulary(method, include):
    """A response a stop string ended, with one vocabulary and a chat template whose end of
    turn is not the tokenizer's eos_token (Gemma's <end_of_turn> vs <eos>): the small models
    score the text returned and then the template's end of turn, as score(text,
    finished=True) and a search across vocabularies do (SmallPrompt.end_id)."""
    tok = chat_tokenizer(GEMMA3, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"])
    engine, pair = chat_engine(tok)
    stopped = 0
    for seed in range(5):
        common = dict(max_new_tokens=10, seed=seed, temperature=1.0,
                      stop=["e", "a", "o", "i"], include_stop_str_in_output=include)
        params = (SearchParams.cbs(2, 2, 3, **common) if method == "cbs"
                  else SearchParams.eft(beta=1.2, n=2, **common))
        for h in engine.search([USER], params)[0].hypotheses:
            if not isinstance(h.stop_reason, str):
                continue
            stopped += 1
            assert h.reward == pytest.approx(
                engine.score([USER], [h.text], finished=True)[0], abs=1e-4)
            assert h.reward == pytest.approx(
                rendered_reward(pair, tok, USER, h.text, True), abs=1e-4)
    assert stopped, "the workload should end responses on stop strings"
    engine.check_all_free()
