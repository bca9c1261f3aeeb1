"""Structured outputs: a grammar every sampled token of the large model must follow.

OpenAI's response_format (json_object, json_schema) and vLLM's structured outputs (json,
regex, choice, grammar) become one spec (SearchParams.structured_output), compiled once per
request against the large model's vocabulary by xgrammar (vLLM's default backend). Each beam
carries a matcher: the root's starts at the grammar's start, a child's is its parent's fork
(Beam.guide), and each token the beam records advances it. Before a decode step samples, each
guided row's matcher says which tokens may come next, as a bitmask of the vocabulary (one bit
a token); the rows' bitmasks ride in one upload and every other token's logit becomes -inf.
Once the structure is complete only the end tokens (EOS, the request's stop token ids) remain,
so a guided response ends where its structure does (or at max_new_tokens, cut).

The next token's mask needs the last one: with async scheduling a guided beam waits for its
token's read before its next step (large/in_flight.continues_after).
"""

import json
import re

import numpy as np
import torch

from w2s_engine.params import InvalidParam


def available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


class Guides:
    """The large model's grammar compiler (its vocabulary read once) and the masks of a step."""

    def __init__(self, tokenizer, vocab_size: int, end_ids: set[int]):
        """vocab_size: the tokenizer's tokens (an LM head's padding rows past it are never
        sampled); end_ids: the model's EOS ids, which end a complete structure."""
        self.tokenizer, self.vocab_size, self.end_ids = tokenizer, vocab_size, sorted(end_ids)
        self._compiler = None
        self._batch = None       # xgrammar's threads filling a step's bitmasks

    def compiler(self):
        if self._compiler is None:     # (a few hundred ms for a real vocabulary: when first used)
            import xgrammar as xgr
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.end_ids)
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def compile(self, spec: dict, field: str = "structured_output"):
        """The spec's compiled grammar; InvalidParam naming `field` where it is not one (a
        JSON schema, regex or grammar xgrammar cannot read)."""
        if not available():
            raise InvalidParam(field, spec, "structured outputs need xgrammar: pip install "
                               "'w2s-engine[serve]' (or xgrammar), or leave it out")
        kind = next(k for k in spec if k != "any_whitespace")
        value, spaces = spec[kind], spec.get("any_whitespace", True)
        compiler = self.compiler()
        try:
            if kind == "json":
                return compiler.compile_json_schema(
                    value if isinstance(value, str) else json.dumps(value),
                    any_whitespace=spaces)
            if kind == "json_object":      # (OpenAI's JSON mode: an object, not any value)
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=spaces)
            if kind == "regex":
                return compiler.compile_regex(value)
            if kind == "choice":
                return compiler.compile_grammar(
                    "root ::= " + " | ".join(
                        # (characters as they are: xgrammar reads the \uD83D\uDC4D of
                        # ensure_ascii as two code points, not one character)
                        json.dumps(c, ensure_ascii=False) for c in value))
            return compiler.compile_grammar(value)
        except (RuntimeError, ValueError) as e:   # xgrammar's errors on what it cannot read
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            # (its C++ log prefix, "[22:40:21] /project/cpp/regex_converter.cc:94: ", says
            # nothing to the client)
            first = re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", first)
            raise InvalidParam(field, spec, f"not a {kind} this engine can follow: "
                               f"{first[:300]}") from None

    def matcher(self, grammar, stop_token_ids: list[int]):
        """A matcher at the grammar's start; a complete structure ends with the model's EOS
        or one of the request's stop token ids."""
        import xgrammar as xgr
        return xgr.GrammarMatcher(grammar, override_stop_tokens=sorted(
            set(self.end_ids) | set(stop_token_ids)))

    def bitmask(self, matchers: list) -> np.ndarray:
        """The tokens each matcher takes next: int32 words [len(matchers), ceil(V / 32)], bit
        t % 32 of word t // 32 set where token t may come. Filled by xgrammar's threads (half
        the cores): the device waits meanwhile, and a row of a 262k vocabulary can take
        tens of microseconds (bench/structured_host.py)."""
        import xgrammar as xgr
        mask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher()
        self._batch.batch_fill_next_token_bitmask(matchers, mask)
        return mask.numpy()


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor,
                  vocab_size: int) -> torch.Tensor:
    """logits [B, V'] with the tokens a row's bitmask leaves out at -inf: rows [G] int64 (the
    guided rows), bitmask [G, ceil(vocab_size / 32)] int32; columns past vocab_size (an LM
    head's padding) are -inf too. PyTorch, any device."""
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().reshape(len(rows), -1)[:, :vocab_size]
    keep = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[:, :vocab_size] = allowed
    return logits.index_copy(0, rows, logits[rows].masked_fill(~keep, float("-inf")))
