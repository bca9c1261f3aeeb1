"""fp32 means fp32 (precision.py): an fp32 engine's forwards run with full-precision fp32
matmuls even when the process lets them use TF32, and the process's setting comes back after.
(On this CPU the setting changes no result; the `gpu` test in test_search.py holds an fp32
engine's rewards to a scratch fp32 recompute with TF32 allowed.)"""

import subprocess
import sys
import textwrap

import torch

from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams
import w2s_engine.models.runner as runner_module
from w2s_engine.models.runner import ModelRunner

BUILD_AND_SEARCH = textwrap.dedent('''
    tok = make_tokenizer(300)
    untuned = tiny_llama(len(tok), seed=2)
    seen = []   # the precision each forward ran at
    forward = ModelRunner.forward
    def noted(self, batch):
        seen.append(precision())
        return forward(self, batch)
    ModelRunner.forward = noted
    probe = runner_module.probe      # the load-time check, run by each ModelRunner
    runner_module.probe = lambda runner: seen.append(precision()) or probe(runner)
    try:
        cast = (lambda m: m.to(DTYPE)) if CAST else (lambda m: m)
        engine = Engine((cast(tiny_llama(len(tok), seed=1)), tok),
                        (cast(tuned_from(untuned, 3, 0.3)), tok), (cast(clone(untuned)), tok),
                        num_kv_blocks=200, block_size=4, progress=False, device="cpu",
                        dtype=DTYPE)
        after_load = precision()
        engine.search(["I really"], SearchParams.cbs(2, 2, 3, max_new_tokens=6, seed=1))
        engine.score(["I really"], [" liked it"])
    finally:
        ModelRunner.forward = forward
        runner_module.probe = probe
''')


def run_engine(dtype, precision, cast=False) -> tuple[list, str, str]:
    """(the precision of every forward of a load, a search and a score, the precision after
    the load, the precision after all). The models are fp32 pairs in memory (which keep
    their dtype whatever the config's), or cast to dtype."""
    scope = {"make_tokenizer": make_tokenizer, "tiny_llama": tiny_llama, "clone": clone,
             "tuned_from": tuned_from, "Engine": Engine, "SearchParams": SearchParams,
             "ModelRunner": ModelRunner, "runner_module": runner_module, "DTYPE": dtype,
             "precision": precision, "CAST": cast}
    exec(BUILD_AND_SEARCH, scope)
    return scope["seen"], scope["after_load"], precision()


def test_an_fp32_engine_runs_its_forwards_at_full_precision_when_the_process_allows_tf32():
    torch.set_float32_matmul_precision("high")    # as a training script that allows TF32
    try:
        seen, after_load, after = run_engine(torch.float32, torch.get_float32_matmul_precision)
        assert len(seen) > 3 and set(seen) == {"highest"}   # the probes, search, score()
        assert after_load == after == "high"        # the process's setting is back
        # fp32 models in memory under a bf16 config keep fp32: their matmuls are fp32 ones
        seen, _, after = run_engine(torch.bfloat16, torch.get_float32_matmul_precision)
        assert set(seen) == {"highest"} and after == "high"
        seen, _, after = run_engine(torch.bfloat16, torch.get_float32_matmul_precision, True)
        assert set(seen) == {"high"} and after == "high"   # bf16 does not read it: untouched
    finally:
        torch.set_float32_matmul_precision("highest")


def test_a_process_that_set_tf32_per_backend_gets_it_back_without_mixed_api_errors():
    """torch refuses to read the legacy setting once the per-backend API was used (and the
    other way round): the engine answers in the API the process used. In a subprocess, so
    that this test's setting does not reach the others."""
    code = textwrap.dedent('''
        import sys, torch
        sys.path.insert(0, "tests")
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        import test_precision
        knob = lambda: torch.backends.cuda.matmul.fp32_precision
        seen, after_load, after = test_precision.run_engine(torch.float32, knob)
        assert seen and set(seen) == {"ieee"}, seen
        assert after_load == after == "tf32", (after_load, after)
        print("ok")
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
