"""The Python API's settings refused up front, naming what to change (an audit's findings)."""

import pytest

from tiny_models import make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams
from w2s_engine.config import EngineConfig


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(300)


def large_alone(tok, **config):
    return Engine((tiny_llama(len(tok), seed=1), tok),
                  **{"block_size": 4, "progress": False, "num_kv_blocks": 50, **config})


def test_fused_ops_with_torch_compile_is_refused_not_dropped():
    # The runner fuses only without compile: an explicit True would be dropped silently.
    with pytest.raises(ValueError, match="fused_ops=True and torch_compile"):
        EngineConfig(device="cpu", fused_ops=True, torch_compile=True).resolve()
    assert EngineConfig(device="cpu", torch_compile=True).resolve().fused_ops is False
    with pytest.raises(ValueError, match="torch_compile=''"):
        EngineConfig(device="cpu", torch_compile="").resolve()


@pytest.mark.parametrize("setting, named", [
    ({"num_kv_blocks": 10**12}, "num_kv_blocks"),
    ({"block_size": 2**30}, "block_size"),
    ({"num_kv_blocks": None, "cpu_kv_cache_bytes": 10**18}, "cpu_kv_cache_bytes"),
    ({"cuda_graphs": True, "cuda_graph_max_batch": 10**9}, "cuda_graph_max_batch")])
def test_pools_past_the_memory_are_refused_naming_the_setting(tok, setting, named):
    # (not the allocator's "can't allocate memory: you tried to allocate ... bytes")
    with pytest.raises(ValueError, match=named):
        large_alone(tok, **setting)


def test_beta_outside_eft_is_refused_as_the_server_does(tok):
    pair = tiny_llama(len(tok), seed=2)
    engine = Engine((tiny_llama(len(tok), seed=1), tok), (tuned_from(pair, seed=3), tok),
                    (pair, tok), block_size=4, progress=False, num_kv_blocks=100)
    for params in (SearchParams(beta=5.0, max_new_tokens=2),
                   SearchParams.base(beta=5.0, max_new_tokens=2),
                   SearchParams.best_of_n(2, beta=0.5, max_new_tokens=2)):
        with pytest.raises(ValueError, match="SearchParams.beta=.*only method='eft'"):
            engine.search("I really", params)
    engine.search("I really", SearchParams.eft(beta=2.0, max_new_tokens=2, seed=0))


def test_check_all_free_names_the_pool_and_the_requests_holding_it(tok):
    engine = large_alone(tok)
    req = engine.add_request("I really", SearchParams.base(max_new_tokens=4, seed=0))
    engine.step()
    with pytest.raises(RuntimeError, match="the large model's KV pool.*1 request"):
        engine.check_all_free()
    engine.cancel(req)
    engine.step()
    engine.check_all_free()


def test_an_unknown_torch_compile_backend_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"torch_compile='inductr' is not a torch.compile "
                                         r"backend here: give True \(inductor\) or one of "
                                         r".*inductor"):
        EngineConfig(torch_compile="inductr").resolve()
    assert EngineConfig(torch_compile="eager").resolve().torch_compile == "eager"


def test_two_settings_that_size_the_kv_pools_are_refused_not_one_dropped():
    # num_kv_blocks won silently over kv_cache_memory_bytes.
    with pytest.raises(ValueError, match="num_kv_blocks=8 and kv_cache_memory_bytes=.*give one"):
        EngineConfig(device="cpu", num_kv_blocks=8, kv_cache_memory_bytes=1 << 20).resolve()


def test_a_gpu_memory_fraction_on_a_cpu_is_said_to_do_nothing(caplog):
    with caplog.at_level("WARNING", logger="w2s_engine.config"):
        assert EngineConfig(device="cpu").resolve().kv_cache_memory_fraction == 0.85
        assert not caplog.records   # the default says nothing
        EngineConfig(device="cpu", kv_cache_memory_fraction=0.5).resolve()
    assert "does nothing on a CPU" in caplog.text and "cpu_kv_cache_bytes" in caplog.text
