"""w2s-engine: a fast decoding engine for weak-to-strong search (Zhou et al. 2024)."""

from w2s_engine.config import EngineConfig
from w2s_engine.engine import Engine, SearchError
from w2s_engine.outputs import Hypothesis, SearchResult, SearchStats
from w2s_engine.params import SearchParams

__all__ = ["Engine", "EngineConfig", "Hypothesis", "SearchError", "SearchParams", "SearchResult",
           "SearchStats"]
