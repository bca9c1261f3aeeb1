"""`python -m llama_cpp.server` with llama.cpp's weight repacking (extra buffer types) off.

    python scripts/llama_cpp_server.py --model FILE.gguf --host 127.0.0.1 --port 8000 ...

Why: on CPUs with AMX (Sapphire Rapids and later Xeons), llama-cpp-python 0.3.36 repacks
Q4_K weights for its AMX matmul, and that kernel dies of a general protection fault at its
first `ldtilecfg` (seen on this project's 2-core Xeon machines: the server accepts the first
completion request, then the process is gone). With repacking off, the same GGUF runs on the
plain CPU kernels. The tests and bench/blackbox_vs_inprocess.py start the server through this;
everything else about the server is stock llama.cpp.
"""

import llama_cpp.llama_cpp as llama_c

_default_model_params = llama_c.llama_model_default_params


def _model_params_without_repacking():
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


llama_c.llama_model_default_params = _model_params_without_repacking

if __name__ == "__main__":
    from llama_cpp.server.__main__ import main
    main()
