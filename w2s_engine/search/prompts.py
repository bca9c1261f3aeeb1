"""Prompt templates and the tokenization rules shared by the search and the scorer.

The rules follow the reference implementation, so that both score the same text alike:
- the large model's templated prompt is tokenized with the tokenizer's special tokens;
- each small model's templated prompt without them (an engine option turns them on);
- a small model's response tokens are those of tokenize(templated prompt + response text)
  from the first position where that differs from tokenize(templated prompt).
"""

from dataclasses import dataclass

from w2s_engine.search.bridge import retokenize
from w2s_engine.search.tokens import Tokenized, common_prefix, encode, tokenize

ROLES = ("large", "tuned", "untuned")


@dataclass(frozen=True)
class Template:
    text: str = "{prompt}"
    chat: bool = False  # use the tokenizer's chat template (one user turn) instead of `text`

    def apply(self, tokenizer, prompt) -> str:
        """prompt: a string, or chat messages [{'role': ..., 'content': ...}, ...]."""
        if self.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"chat=True but the tokenizer of {tokenizer.name_or_path!r} has no "
                                 "chat template: pass a template string with {prompt} instead")
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        if isinstance(prompt, list):
            # Messages without a chat template: a plain transcript the template wraps.
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"
        # replace, not format: prompts and templates may hold other braces
        return self.text.replace("{prompt}", prompt)


def parse_templates(templates: dict | None, chat: bool) -> dict[str, Template]:
    """{'large': ..., 'small': ..., 'tuned': ..., 'untuned': ...} -> a Template per role."""
    templates = dict(templates or {})
    unknown = set(templates) - {"large", "small", "tuned", "untuned"}
    if unknown:
        raise ValueError(f"templates has unknown keys {sorted(unknown)}: use large, small, tuned, untuned")
    out = {}
    for role in ROLES:
        text = templates.get(role, templates.get("small") if role != "large" else None)
        if text is None:
            text = "{prompt}"
        if not isinstance(text, str) or "{prompt}" not in text:
            raise ValueError(f"template for {role!r} is {text!r}: it must be a string containing "
                             "'{prompt}' where the prompt goes")
        out[role] = Template(text, chat)
    return out


def check_context(role: str, limit: int | None, prompt_len: int, max_new: int):
    """A prompt and its longest response must fit the model's context."""
    if limit is not None and prompt_len + max_new > limit:
        raise ValueError(f"the {role} model's context is {limit} tokens; the prompt has "
                         f"{prompt_len} and max_new_tokens is {max_new}: shorten the prompt "
                         "or lower max_new_tokens")


@dataclass
class SmallPrompt:
    """A small model's templated prompt and how response text becomes its tokens."""

    tokenizer: object
    text: str
    ids: list[int]
    starts: list[int]   # character offset of each prompt token
    special: bool

    @classmethod
    def make(cls, tokenizer, template: Template, prompt: str, special: bool) -> "SmallPrompt":
        text = template.apply(tokenizer, prompt)
        special = special and not template.chat  # a rendered chat template has its own
        tok = tokenize(tokenizer, text, special)
        return cls(tokenizer, text, tok.ids, tok.starts, special)

    def full_ids(self, response_text: str) -> tuple[list[int], int]:
        """(tokenize(prompt + response), first position where it differs from the prompt's)."""
        full = encode(self.tokenizer, self.text + response_text, self.special)
        return full, common_prefix(full, self.ids)

    def extend(self, old: Tokenized, response_text: str) -> tuple[Tokenized, int]:
        """full_ids() computed incrementally from the stream's last tokenization `old`."""
        new = retokenize(self.tokenizer, self.special, old, self.text + response_text)
        return new, common_prefix(new.ids, self.ids)
