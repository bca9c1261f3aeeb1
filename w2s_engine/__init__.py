"""w2s-engine: a fast decoding engine for weak-to-strong search (Zhou et al. 2024)."""

from w2s_engine.config import EngineConfig
from w2s_engine.outputs import Hypothesis, SearchResult, SearchStats
from w2s_engine.params import SearchParams
from w2s_engine.search.stream import SearchDelta

__all__ = ["Engine", "EngineConfig", "Hypothesis", "SearchDelta", "SearchError", "SearchParams", "SearchResult",
           "SearchStats"]


def __getattr__(name):
    # The engine pulls in transformers and the kernels: import it on first use, so that
    # `w2s --help` and light imports stay fast.
    if name in ("Engine", "SearchError"):
        from w2s_engine import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'w2s_engine' has no attribute {name!r}")
