"""SearchParams: which search to run and how to sample, with presets for the paper's methods."""

from dataclasses import dataclass, field, replace

METHODS = ("cbs", "best_of_n", "base", "eft")


@dataclass
class SearchParams:
    """Chunk-level beam search CBS(W, K, L) and its special cases.

    cbs:        keep the top `w` of w·k candidates every `l` sampled tokens.
    best_of_n:  CBS(1, N, inf): N full samples, the best by reward wins.
    base:       `k` plain samples from the large model, no small model runs.
    eft:        token-level proxy-tuning, logits_large + beta * (logits_tuned - logits_untuned);
                needs one shared vocabulary.
    """

    method: str = "cbs"
    w: int = 4
    k: int = 4
    l: int | None = 5            # chunk length in large-model tokens; None = until the end
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 0               # 0 = off
    top_p: float = 1.0           # 1.0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    beta: float = 1.0            # eft only
    trace: bool = False          # record every selection (candidates, rewards, survivors)

    @classmethod
    def cbs(cls, w: int = 4, k: int = 4, l: int = 5, **kw) -> "SearchParams":
        return cls(method="cbs", w=w, k=k, l=l, **kw)

    @classmethod
    def best_of_n(cls, n: int = 16, **kw) -> "SearchParams":
        return cls(method="best_of_n", w=1, k=n, l=None, **kw)

    @classmethod
    def base(cls, n: int = 1, **kw) -> "SearchParams":
        return cls(method="base", w=1, k=n, l=None, **kw)

    @classmethod
    def eft(cls, beta: float = 1.0, **kw) -> "SearchParams":
        return cls(method="eft", w=1, k=1, l=None, beta=beta, **kw)

    @property
    def chunk_len(self) -> int:
        return self.max_new_tokens if self.l is None else min(self.l, self.max_new_tokens)

    @property
    def uses_small_models(self) -> bool:
        return self.method != "base"

    def copy(self, **changes) -> "SearchParams":
        return replace(self, **changes)

    def validate(self):
        """Raise ValueError naming the field and what to change."""
        def bad(name, why):
            raise ValueError(f"SearchParams.{name}={getattr(self, name)!r}: {why}")

        if self.method not in METHODS:
            bad("method", f"must be one of {', '.join(METHODS)}")
        for name in ("w", "k", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, "must be an integer >= 1")
        if self.l is not None and (not isinstance(self.l, int) or self.l < 1):
            bad("l", "must be an integer >= 1, or None for no chunking")
        if self.method == "best_of_n" and self.w != 1:
            bad("w", "best_of_n keeps one beam: use w=1 (or method='cbs')")
        if self.method in ("base", "eft") and self.w != 1:
            bad("w", f"{self.method} runs no selection: use w=1")
        if self.method == "eft" and self.k != 1:
            bad("k", "eft samples one stream: use k=1")
        if not self.temperature >= 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", "must be a non-negative integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be a list of non-empty strings")
