"""w2s-engine: a fast decoding engine for weak-to-strong search (Zhou et al. 2024)."""

from w2s_engine.config import EngineConfig
from w2s_engine.one_thread import EngineBusy
from w2s_engine.outputs import Hypothesis, SearchResult, SearchStats, TokenLogprob
from w2s_engine.params import SearchParams
from w2s_engine.search.stream import SearchDelta

__all__ = ["Engine", "EngineBusy", "EngineConfig", "Hypothesis", "OpenAICompletions",
           "SearchDelta", "SearchError", "SearchParams", "SearchResult", "SearchStats",
           "TokenLogprob", "__version__"]
LAZY = {"Engine": "w2s_engine.engine", "SearchError": "w2s_engine.engine",
        # the black-box large model; it needs the openai client: pip install 'w2s-engine[remote]'
        "OpenAICompletions": "w2s_engine.large.openai_completions"}


def __getattr__(name):
    # The engine pulls in transformers and the kernels: import it on first use, so that
    # `w2s --help` and light imports stay fast.
    if name in LAZY:
        import importlib
        return getattr(importlib.import_module(LAZY[name]), name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("w2s-engine")
        except PackageNotFoundError:
            return "0+unknown"
    raise AttributeError(f"module 'w2s_engine' has no attribute {name!r}")


def __dir__():
    # dir() and completion in a REPL or editor list the lazy names too
    return sorted(set(globals()) | set(__all__))
