"""OpenAI request bodies plus the search fields (method, w, k, l, beta, top_k).

Fields the engine does not use (user, logit_bias, ...) are accepted and ignored, as OpenAI
clients send them; a known field of the wrong type or out of range is a 422 naming it.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from w2s_engine.params import SearchParams


class SearchFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=128, description="choices: n plain samples with method=base")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    stream: Literal[False] = False
    # None: cbs, or base when the engine has no small models
    method: Literal["cbs", "best_of_n", "base", "eft"] | None = None
    w: int = Field(default=4, ge=1)
    k: int = Field(default=4, ge=1)
    l: int | None = Field(default=5, ge=1)
    beta: float = 1.0

    def params(self, default_max_tokens: int, default_method: str = "cbs") -> SearchParams:
        method = self.method or default_method
        common = dict(max_new_tokens=self.max_tokens or default_max_tokens,
                      temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                      seed=self.seed, stop=[self.stop] if isinstance(self.stop, str) else
                      list(self.stop or []))
        if method != "cbs" and "w" in self.model_fields_set and self.w != 1:
            # Say so rather than ignore it: only CBS keeps several beams.
            raise ValueError(f"SearchParams.w={self.w}: method={method!r} keeps one beam; "
                             "use w=1 or method='cbs'")
        if self.n > 1 and method != "base":
            raise ValueError(f"SearchParams.n={self.n}: several choices come only from "
                             "method='base' (n samples); a search returns its best, with the W "
                             "survivors under 'w2s.hypotheses'")
        if method == "best_of_n":
            return SearchParams.best_of_n(self.k, **common)
        if method == "base":
            return SearchParams.base(n=self.n, **common)
        if method == "eft":
            return SearchParams.eft(self.beta, **common)
        return SearchParams.cbs(self.w, self.k, self.l, **common)


class CompletionRequest(SearchFields):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(SearchFields):
    messages: list[ChatMessage] = Field(min_length=1)
