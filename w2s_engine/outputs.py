"""What a search returns."""

from dataclasses import asdict, dataclass, field


@dataclass
class TokenLogprob:
    """The large model's log-probability of one returned token (its raw distribution, before
    temperature, top-k/top-p or EFT steering), and the most likely tokens at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token id, logprob), best first


@dataclass
class Hypothesis:
    text: str
    token_ids: list[int]          # large-model tokens (EOS excluded)
    # The small models' response tokens that were scored: the first scorer's that reads the
    # response as it is ([] with a process reward model alone: its text has step tags).
    small_token_ids: list[int]
    reward: float | None          # its scorer's reward (None for base)
    finished: bool                # ended by EOS or a stop string (not cut by max_new_tokens)
    finish_reason: str            # "stop" or "length"
    logprobs: list[TokenLogprob] | None = None   # one per token_ids entry, when asked for
    chunk_rewards: list[float] | None = None     # its reward at each selection it survived
    # large-model tokens of the response: len(token_ids), or a black box's count (its ids
    # never come here)
    num_tokens: int = 0
    # what ended it (vLLM's stop_reason): the stop string or the stop token id; None for EOS,
    # the length cap, and a black-box large model's server's stop that it does not name
    stop_reason: str | int | None = None


@dataclass
class SearchStats:
    prompt_tokens: int = 0        # the large model's templated prompt (a black box's: its server's count)
    tokens_forwarded: dict[str, int] = field(default_factory=dict)  # per model role
    # prompt tokens each model read from the prefix cache instead of forwarding them
    cached_prompt_tokens: dict[str, int] = field(default_factory=dict)
    tokens_scored: int = 0        # reward terms computed (chunk tokens + EOS terms)
    tokens_sampled: int = 0       # large-model tokens sampled, over all candidates
    peak_kv_blocks: dict[str, int] = field(default_factory=dict)    # per model role
    chunks: int = 0
    seconds: float = 0.0


@dataclass
class SearchResult:
    prompt: str
    text: str
    token_ids: list[int]
    small_token_ids: list[int]
    reward: float | None
    finished: bool
    finish_reason: str
    hypotheses: list[Hypothesis]  # the W survivors, best first
    stats: SearchStats
    trace: list[dict] | None = None   # one entry per selection when SearchParams.trace

    def to_dict(self) -> dict:
        return asdict(self)
