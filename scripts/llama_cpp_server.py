"""`python -m llama_cpp.server` with llama.cpp's weight repacking (extra buffer types) off.

    python scripts/llama_cpp_server.py --model FILE.gguf --host 127.0.0.1 --port 8000 ...

Why: on CPUs with AMX (Sapphire Rapids and later Xeons), llama-cpp-python 0.3.36 repacks
Q4_K weights for its AMX matmul, and that kernel dies of a general protection fault at its
first `ldtilecfg` (seen on this project's 2-core Xeon machines: the server accepts the first
completion request, then the process is gone). With repacking off, the same GGUF runs on the
plain CPU kernels. Everything else about the server is stock llama.cpp.

The tests and bench/blackbox_vs_inprocess.py start it with `start_server`, which waits until
it answers and returns the process and its OpenAI base URL.
"""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, n_ctx: int, threads: int, timeout_s: float = 120.0):
    """Start this script as a server on a free port of 127.0.0.1; returns (process, base URL).
    Raises RuntimeError if it exits or does not answer /v1/models within timeout_s."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--model", str(model),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
         "--n_threads", str(threads), "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited at start (code {proc.returncode})")
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"llama.cpp server did not answer in {timeout_s:.0f} s")


def _serve_without_repacking():
    import llama_cpp.llama_cpp as llama_c
    default_params = llama_c.llama_model_default_params

    def model_params_without_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_c.llama_model_default_params = model_params_without_repacking
    from llama_cpp.server.__main__ import main
    main()


if __name__ == "__main__":
    _serve_without_repacking()
