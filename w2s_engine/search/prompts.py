"""Prompt templates and the tokenization rules shared by the search and the scorer.

The rules follow the reference implementation, so that both score the same text alike:
- the large model's templated prompt is tokenized with the tokenizer's special tokens;
- each small model's templated prompt without them (an engine option turns them on);
- a small model's response tokens are those of tokenize(templated prompt + response text)
  from the first position where that differs from tokenize(templated prompt).
"""

import os
from dataclasses import dataclass, field

from w2s_engine.params import InvalidParam, check_text
from w2s_engine.search.bridge import retokenize_many
from w2s_engine.search.tokens import Tokenized, common_prefix, common_prefix_after, encode, \
    tokenize

ROLES = ("large", "tuned", "untuned")
CHAT_ROLES = ("system", "user", "assistant", "tool")   # "tool" only where the template has it


def check_prompt(prompt, tool_role: bool = False):
    """A prompt as the engine takes it, normalized: a non-empty str, or chat messages, a
    non-empty list of {'role': one of CHAT_ROLES, 'content': str or a list of text parts
    {'type': 'text', 'text': str}} (parts are joined by newlines, as vLLM does). Raises
    TypeError for a wrong type and InvalidParam (a ValueError) for a wrong value, each naming
    the place ('prompt', 'messages.1.role') and what was expected."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidParam("prompt", prompt, "must be a non-empty string")
        check_text("prompt", prompt)
        return prompt
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"prompt {type(prompt).__name__} {_brief(prompt)}: expected a str, or "
                        "chat messages (a list of {'role': str, 'content': str})")
    if not prompt:
        raise InvalidParam("messages", prompt, "must hold at least one message")
    roles = CHAT_ROLES if tool_role else CHAT_ROLES[:3]
    out = []
    for i, m in enumerate(prompt):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            # Texts where one prompt goes (search_stream, score's items, AsyncEngine): said so.
            several = ("; a list of texts is several prompts, and one goes here: pass them "
                       "one at a time, or as Engine.search()'s list of prompts"
                       if all(isinstance(x, str) for x in prompt) else "")
            raise TypeError(f"{where}: expected a dict {{'role': str, 'content': str}}, got "
                            f"{type(m).__name__}{several}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise TypeError(f"{where}.role: expected a str, got {type(role).__name__}")
        if role == "developer":
            role = "system"      # OpenAI's newer name for the system message (vLLM's rule)
        if role not in roles:
            why = f"must be one of {', '.join(roles)} (or developer, taken as system)"
            if role == "tool":
                why += " (tool messages need chat=True and chat templates that render them)"
            raise InvalidParam(f"{where}.role", role, why)
        out.append({"role": role, "content": _content(f"{where}.content", content)})
    return out


def _content(where: str, content) -> str:
    if isinstance(content, str):
        check_text(where, content)
        return content
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"{where}: expected a str or a list of text parts "
                        f"{{'type': 'text', 'text': str}}, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidParam(f"{where}.{j}", kind, "only text parts {'type': 'text', "
                               "'text': str} are supported")
        check_text(f"{where}.{j}.text", part["text"])
        texts.append(part["text"])
    return "\n".join(texts)


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def template_has_tool_role(tokenizer) -> bool:
    """Whether a tokenizer's chat template renders messages of role 'tool'."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates
        template = template.get("default", "")
    return isinstance(template, str) and "tool" in template


@dataclass(frozen=True)
class Template:
    text: str = "{prompt}"
    chat: bool = False  # use the tokenizer's chat template (one user turn) instead of `text`

    def rendered_as(self, chat: bool | None) -> "Template":
        """This template, its chat rendering switched on or off for one request (None: as
        it is): OpenAI's completions endpoint never applies a chat template."""
        return self if chat is None or chat == self.chat else Template(self.text, chat)

    @property
    def is_identity(self) -> bool:
        """The prompt goes in as it is."""
        return not self.chat and self.text == "{prompt}"

    def apply(self, tokenizer, prompt, continue_final: bool = False,
              template_kwargs: dict | None = None) -> str:
        """prompt: a string, or chat messages [{'role': ..., 'content': ...}, ...].
        continue_final: the last message (the assistant's) is left open, and the response
        continues its text (vLLM's continue_final_message), instead of a new turn opened.
        template_kwargs: more variables for a chat template (vLLM's chat_template_kwargs,
        such as enable_thinking); a text template has none to take."""
        if self.chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.render(tokenizer, messages, not continue_final, continue_final,
                               template_kwargs)
        if isinstance(prompt, list):
            # Messages without a chat template: a plain transcript the template wraps.
            head = prompt[:-1] if continue_final else prompt
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in head) + "assistant:" + (
                f" {prompt[-1]['content']}" if continue_final else "")
        # replace, not format: prompts and templates may hold other braces
        return self.text.replace("{prompt}", prompt)

    @staticmethod
    def render(tokenizer, messages: list, generation_prompt: bool,
               continue_final: bool = False, template_kwargs: dict | None = None) -> str:
        """The tokenizer's chat template over messages, as text (continue_final: the last
        message left open, transformers' continue_final_message; template_kwargs: the
        template's own variables, checked by check_template_kwargs)."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"chat=True but the tokenizer of {tokenizer.name_or_path!r} has no "
                             "chat template: pass a template string with {prompt} instead")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=generation_prompt,
                                                 continue_final_message=continue_final,
                                                 **(template_kwargs or {}))
        except Exception as e:  # jinja2's TemplateError: raise_exception() in the template
            if continue_final and isinstance(e, ValueError) and "final message" in str(e):
                # transformers': the template does not render the last message's text as
                # given (it strips or rewrites it), so there is no end of it to continue
                raise InvalidParam("continue_final_message", True, "", message=(
                    f"continue_final_message: the chat template of {tokenizer.name_or_path!r} "
                    "does not render the last message's text as it is, so it cannot be "
                    "continued; leave continue_final_message out")) from None
            if type(e).__module__.split(".")[0] != "jinja2":
                raise
            raise InvalidParam("messages", messages, f"the chat template of "
                               f"{tokenizer.name_or_path!r} refused them: {e}") from None


RESPONSE_MARK = "\u2063w2s-response\u2063"   # where a chat template puts the response


@dataclass(frozen=True)
class ResponseTemplate:
    """A reward model's rendering of prompt + response: "...{prompt}...{response}...", or
    "chat" (its chat template, the prompt as the user's turn, the response as the assistant's).
    The response grows at the end of the first part; the second (an end-of-turn token, say) is
    appended for each read."""

    text: str = "{prompt}{response}"

    def __post_init__(self):
        if self.text != "chat" and (not isinstance(self.text, str)
                                    or self.text.count("{response}") != 1
                                    or "{prompt}" not in self.text.split("{response}")[0]):
            raise ValueError(f"reward model template {self.text!r}: use 'chat', or a string with "
                             "'{prompt}' and then '{response}' once")

    def around(self, tokenizer, prompt, continue_final: bool = False,
               template_kwargs: dict | None = None) -> tuple[str, str]:
        """(the text before the response, the text after it) for this prompt (continue_final:
        the response continues the last message, the assistant's; template_kwargs: the chat
        template's variables)."""
        if self.text != "chat":
            before, after = self.text.split("{response}")
            return Template(before).apply(tokenizer, prompt, continue_final), after
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"template='chat', but the tokenizer of {tokenizer.name_or_path!r} "
                             "has no chat template: pass a template string with '{prompt}' and "
                             "then '{response}', such as '{prompt}\\n{response}'")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if continue_final:   # the response goes on from the assistant's text
            messages = messages[:-1] + [{"role": "assistant",
                                         "content": messages[-1]["content"] + RESPONSE_MARK}]
        else:
            messages = messages + [{"role": "assistant", "content": RESPONSE_MARK}]
        rendered = Template(chat=True).render(tokenizer, messages, False,
                                              template_kwargs=template_kwargs)
        if rendered.count(RESPONSE_MARK) != 1:
            raise ValueError(f"the chat template of {tokenizer.name_or_path!r} does not render an "
                             "assistant turn as given: pass a template string with {prompt} and "
                             "{response}")
        before, after = rendered.split(RESPONSE_MARK)
        return before, after

    def content_rule(self, tokenizer) -> str | None:
        """What the chat template does to the assistant's text, which the scorer then does to
        each response (SmallPrompt.response): "" nothing; "l", "r", "lr": strips whitespace
        on the left, the right, both (Llama 3's trims it); None: something else (Qwen3's
        moves a reasoning block), which the scorer does not follow. A text template: ""."""
        if self.text != "chat":
            return ""
        before, after = self.around(tokenizer, "Hi")
        edges = _render_reply(tokenizer, " \n" + RESPONSE_MARK + "\n ")
        left = "" if edges.startswith(before + " \n") else "l"
        right = "" if edges.endswith("\n " + after) else "r"
        kept = (before + ("" if left else " \n") + RESPONSE_MARK + ("" if right else "\n ")
                + after)
        reasoning = "<think>\nw\n</think>\n\n" + RESPONSE_MARK
        if edges != kept or _render_reply(tokenizer, reasoning) != before + reasoning + after:
            return None
        return left + right

    def content_change(self, tokenizer) -> tuple[str, str] | None:
        """(a probe response, what the chat template renders of it) where the template
        changes the assistant's text in a way the scorer does not follow (content_rule:
        None), for the warning at load; else None."""
        if self.content_rule(tokenizer) is not None:
            return None
        probe = " \n<think>\nw\n</think>\n\n" + RESPONSE_MARK + "\n "
        rendered = _render_reply(tokenizer, probe)
        turn = rendered[rendered.rindex("Hi") + 2:] if "Hi" in rendered else rendered
        return (probe.replace(RESPONSE_MARK, "{response}"),
                turn.replace(RESPONSE_MARK, "{response}")[:120])


def end_of_turn_id(tokenizer, prompt, continue_final: bool = False,
                   template_kwargs: dict | None = None) -> int | None:
    """The token a chat template ends the assistant's turn with after this prompt: the first
    token it renders after the assistant's text, where that is a special token (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>, Mistral's </s>).
    A finished response is scored with it: the tokenizer's eos_token is not always the end of
    turn (Gemma's is <eos>, Phi-3's <|endoftext|>, which its template writes after <|end|>).
    None: the template ends the turn with text, or none (the eos_token is scored then)."""
    try:
        after = ResponseTemplate("chat").around(tokenizer, prompt, continue_final,
                                                template_kwargs)[1]
    except ValueError:   # no assistant turn as given: the eos_token, as before
        return None
    ids = encode(tokenizer, after, False) if after else []
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(ids[0]) if ids else None
    special = ids and (ids[0] == tokenizer.eos_token_id
                       or (added is not None and getattr(added, "special", False)))
    return ids[0] if special else None


def generation_prompt_change(tokenizer) -> tuple[str, str] | None:
    """(the tail of the prompt the chat template ends with for a reply, the tail of what it
    renders before a reply's text) where they differ: Qwen3's puts an empty reasoning block
    before the last reply but not after its generation prompt (unless enable_thinking is
    false), DeepSeek's old one writes 'Assistant:' and then 'Assistant: ' + the reply. The
    small models score a response after the generation prompt, as the large model wrote it,
    so Engine warns at load. None: alike (or no assistant turn to compare)."""
    messages = [{"role": "user", "content": "Hi"}]
    try:
        opened = Template(chat=True).apply(tokenizer, messages)
        before = ResponseTemplate("chat").around(tokenizer, messages)[0]
    except ValueError:
        return None
    if opened == before:
        return None
    start = max(0, len(os.path.commonprefix([opened, before])) - 20)   # a little context
    return opened[start:][:80], before[start:][:80]


def _render_reply(tokenizer, reply: str) -> str:
    """The chat template's rendering of the user's 'Hi' and this assistant's reply."""
    return Template(chat=True).render(tokenizer, [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": reply}], False)


# apply_chat_template's own arguments (and the template's messages): not a template's variables
_RENDER_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def check_template_kwargs(kwargs) -> dict | None:
    """chat_template_kwargs (vLLM's): the chat templates' own variables, e.g.
    {"enable_thinking": false}; None or {}: none. Names of apply_chat_template's arguments are
    refused: the engine sets those."""
    if kwargs is None or kwargs == {}:
        return None
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidParam("chat_template_kwargs", kwargs,
                           "must be an object of the chat template's variables, such as "
                           "{\"enable_thinking\": false}")
    taken = sorted(set(kwargs) & _RENDER_ARGUMENTS)
    if taken:
        raise InvalidParam("chat_template_kwargs", taken, "", message=(
            f"chat_template_kwargs: {', '.join(taken)} {'is' if len(taken) == 1 else 'are'} "
            "set by the engine, not a chat template's variable: leave "
            f"{'it' if len(taken) == 1 else 'them'} out"))
    return dict(kwargs)


def parse_templates(templates: dict | None, chat: bool) -> dict[str, Template]:
    """{'large': ..., 'small': ..., 'tuned': ..., 'untuned': ...} -> a Template per role."""
    if templates is not None and not isinstance(templates, dict):
        raise TypeError(f"templates: expected a dict such as {{'large': 'Review: {{prompt}}', "
                        f"'small': '{{prompt}}'}}, got {type(templates).__name__}")
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
        # The field to change: the prompt when it fills the context alone.
        name, value = ("prompt", prompt_len) if prompt_len >= limit else ("max_new_tokens",
                                                                          max_new)
        raise InvalidParam(name, value, "too long for the context", message=(
            f"the {role} model's context is {limit} tokens; the prompt has {prompt_len} and "
            f"max_new_tokens is {max_new}: shorten the prompt or lower max_new_tokens"))


@dataclass
class SmallPrompt:
    """A small model's templated prompt and how response text becomes its tokens."""

    tokenizer: object
    text: str
    ids: list[int]
    starts: list[int]   # character offset of each prompt token
    special: bool
    suffix_ids: list[int] = field(default_factory=list)   # a reward model's, after the response
    # What a reward model's chat template does to the assistant's text, done to each response
    # (ResponseTemplate.content_rule): "l", "r" strip whitespace on the left, the right.
    strip: str = ""
    # A chat template's end of turn, scored after a finished response in place of the
    # tokenizer's eos_token (end_of_turn_id); None: the eos_token.
    end_id: int | None = None

    @classmethod
    def make(cls, tokenizer, template, prompt, special: bool, continue_final: bool = False,
             template_kwargs: dict | None = None, strip: str = "") -> "SmallPrompt":
        """template: a Template (the implicit pair's models) or a ResponseTemplate (a reward
        model's: what follows the response is tokenized on its own, as suffix_ids).
        continue_final, template_kwargs: Template.apply's. strip: the ResponseTemplate's
        content_rule, found once per stream."""
        if isinstance(template, ResponseTemplate):
            text, suffix = template.around(tokenizer, prompt, continue_final, template_kwargs)
            special = special and template.text != "chat"
            if continue_final:   # the left edge is the continued message's, already rendered
                strip = strip.replace("l", "")
        else:
            text, suffix = template.apply(tokenizer, prompt, continue_final, template_kwargs), ""
            special = special and not template.chat  # a rendered chat template has its own
        end_id = (end_of_turn_id(tokenizer, prompt, continue_final, template_kwargs)
                  if isinstance(template, Template) and template.chat else None)
        tok = tokenize(tokenizer, text, special)
        return cls(tokenizer, text, tok.ids, tok.starts, special,
                   encode(tokenizer, suffix, False) if suffix else [], strip, end_id)

    def response(self, text: str) -> str:
        """A response's text as the template renders it (strip)."""
        if "l" in self.strip:
            text = text.lstrip()
        return text.rstrip() if "r" in self.strip else text

    def full_ids(self, response_text: str) -> tuple[list[int], int]:
        """(tokenize(prompt + response), first position where it differs from the prompt's,
        and never 0: where the response merges into the prompt's first token ("The" + "se":
        "These", a one-token prompt), nothing predicts position 0, so that token is context,
        not scored; the response's later tokens are)."""
        full = encode(self.tokenizer, self.text + self.response(response_text), self.special)
        return full, max(1, common_prefix(full, self.ids))

    def extend_many(self, olds: list[Tokenized],
                    response_texts: list[str]) -> list[tuple[Tokenized, int, int]]:
        """full_ids() computed incrementally from each stream's last tokenization (`olds`),
        for many streams of this prompt at once; third, how many of its old tokens each kept
        as they are (retokenize_many)."""
        news = retokenize_many(self.tokenizer, self.special, olds,
                               [self.text + self.response(text) for text in response_texts])
        known: dict[int, int] = {}
        return [(new, max(1, self._prompt_prefix(old.ids, new.ids, kept, known)), kept)
                for old, (new, kept) in zip(olds, news)]

    def _prompt_prefix(self, old: list[int], new: list[int], kept: int,
                       known: dict[int, int]) -> int:
        """common_prefix(new, self.ids), where new[:kept] is old[:kept]: within those tokens
        old's own prefix decides it, found once per list (`known`, by id: a chunk's K
        candidates of a beam share their parent's list), and only the rest is compared, not
        the prompt's hundreds of tokens per candidate."""
        k = min(kept, len(self.ids))
        if not k:
            return common_prefix(new, self.ids)
        c = known.get(id(old))
        if c is None:
            c = known[id(old)] = common_prefix(old, self.ids)
        return c if c < k else common_prefix_after(new, self.ids, k)
