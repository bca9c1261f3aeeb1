"""Engine: the three models, their KV pools, and many searches at once.

Wiring: the large model (in this process, or a black box behind an OpenAI-compatible server:
large/), the small pair's scorer (search/scorer.py), EFT where the vocabularies allow it,
the KV budget and the scheduler. One step of the loop reads schedule -> run -> postprocess:
1. schedule: admit waiting requests whose worst-case KV fits; prefill each prompt once per
   model and fork the root into W*K children;
2. run: the large model advances every generating beam of every running request (one token,
   or one whole chunk from a black box); when a request's candidates have all finished their
   chunk, the scorer scores those chunks, the requests in a few parts by request (each part
   launched before the one before it is read; with async scheduling, queued behind the next
   decode step and read the step after);
3. postprocess: those requests select their survivors, free the losers and fork the next
   chunk; a request whose survivors have all finished ends with its result.
One thread drives an Engine at a time (one_thread.py); AsyncEngine serves many callers.
"""

import dataclasses
import functools
import logging
import random
from collections.abc import Iterable, Iterator

import torch
from torch.profiler import record_function   # names the step's phases in a profile
from tqdm.auto import tqdm

from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.cache.kv_budget import KVBudget, pool_blocks
from w2s_engine.config import EngineConfig
from w2s_engine.frozen_heap import freeze_loaded_objects
from w2s_engine.large.local import LocalLarge
from w2s_engine.large.openai_completions import OpenAICompletions
from w2s_engine.large.remote import RemoteLarge
from w2s_engine.models.decode_graphs import DecodeGraphs
from w2s_engine.models.scoring_graphs import ScoringGraphs, context_blocks
from w2s_engine.models.fp8_linear import quantize_fp8
from w2s_engine.models.loader import eos_ids, load_role
from w2s_engine.models.runner import BatchFailed, ModelRunner, ModelShape
from w2s_engine.one_thread import OneThread
from w2s_engine.outputs import SearchResult
from w2s_engine.params import MAX_LOGPROBS, InvalidParam, SearchParams, is_int
from w2s_engine.precision import full_fp32_matmuls
from w2s_engine.scheduler import QueueFull, Scheduler, scoring_parts
from w2s_engine.scoring import ImplicitReward, ProcessRewardModel, RewardModel, scorer_list
from w2s_engine.search.eft import EFT
from w2s_engine.search.prompts import check_context, check_prompt, check_template_kwargs, \
    generation_prompt_change, parse_templates, template_has_tool_role
from w2s_engine.search.request import KVSpace, RequestStatus, SearchRequest
from w2s_engine.search.reward_models import model_head, reward_model_parts
from w2s_engine.search.scorer import NoRoomYet, Scorer, ScoringLaunch
from w2s_engine.search.sequence import Beam
from w2s_engine.search.stream import FinalText, SearchDelta
from w2s_engine.search.tokens import encode

log = logging.getLogger("w2s_engine")
EFT_GRAPH_MAX_BATCH = 64    # EFT rows a step on the small models' graphs (more run eagerly)
# An extend on static buffers (a graph per rows bucket, tokens bucket and longest row): a
# scorer's chunks, and every model's prefill chunks (eager, a prompt's chunk is some 700
# launches of three models' modules, which leave the GPU waiting). At most this many tokens
# (16 requests' CBS(4,4,8) chunks; a prompt's chunk of max_batch_tokens up to it) and
# sequences; larger forwards run eagerly.
SCORING_GRAPH_MAX_TOKENS = 2048
SCORING_GRAPH_MAX_ROWS = 256


def exact_fp32(method):
    """An Engine method whose fp32 matmuls run at full precision (precision.py) when the
    engine is fp32, whatever the process allows."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with full_fp32_matmuls(self.matmul_dtype):
            return method(self, *args, **kwargs)
    return run


def one_thread(method):
    """An Engine method that drives the engine: on one thread at a time (one_thread.py)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.one_thread.claim(f"Engine.{method.__name__}()"):
            return method(self, *args, **kwargs)
    return run


def check_logprobs(logprobs):
    """None, or the alternatives per token: an integer in [0, MAX_LOGPROBS]."""
    if logprobs is not None and (not is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise InvalidParam("logprobs", logprobs, f"give None or the alternatives per token, "
                           f"an integer in [0, {MAX_LOGPROBS}]")


class SearchError(RuntimeError):
    """A request failed while running; the engine and the other requests went on.
    From search() of several prompts: results, each prompt's SearchResult or None where it
    failed (the others' are not lost); errors, each failed prompt's index -> why."""

    def __init__(self, message: str, results: list | None = None, errors: dict | None = None):
        super().__init__(message)
        self.results = results or []
        self.errors = errors or {}


def _check_continued(prompt, continue_final_message: bool):
    """continue_final_message needs chat messages whose last is the assistant's."""
    if continue_final_message and not (isinstance(prompt, list)
                                       and prompt[-1]["role"] == "assistant"):
        ends = "a text prompt" if isinstance(prompt, str) else \
            f"messages ending with a {prompt[-1]['role']!r} one"
        raise InvalidParam("continue_final_message", True, "", message=(
            "continue_final_message: continuing the last message needs chat messages whose "
            f"last is the assistant's (the text to go on from), not {ends}; leave it out, "
            "or end the messages with an assistant message"))


class Engine:

    def __init__(self, large, tuned=None, untuned=None, templates: dict | None = None,
                 chat: bool = False, config: EngineConfig | None = None, scorer=None,
                 **overrides):
        """large: a model spec, a (model, tokenizer) pair, or OpenAICompletions (a black box).
        tuned, untuned: the small pair of the implicit reward. scorer: ImplicitReward(),
        RewardModel(...) or a weighted list of them (w2s_engine/scoring.py); by default the
        implicit reward when the pair is given."""
        self.one_thread = OneThread()   # the thread driving it now (step, search, ...)
        if config is not None and not isinstance(config, EngineConfig):
            raise TypeError(f"config: expected an EngineConfig, got {type(config).__name__}; "
                            "or pass its fields as keywords: Engine(..., num_kv_blocks=...)")
        if config is not None and overrides:
            config = dataclasses.replace(config, **overrides)   # keywords win over config=
        self.config = config = (config or EngineConfig(**overrides)).resolve()
        remote = large if isinstance(large, OpenAICompletions) else None
        if (tuned is None) != (untuned is None):
            raise ValueError("pass both tuned and untuned small models, or neither (base only)")
        scorers = scorer_list(scorer, has_pair=tuned is not None)
        if remote and not scorers:
            raise ValueError("a black-box large model needs a scorer: the tuned and untuned "
                             "small models, or scorer=RewardModel(...)")
        if remote and chat:
            raise ValueError("chat=True needs the large model's tokenizer; with a black-box large "
                             "model pass a template string for 'large' instead")
        self.templates = parse_templates(templates, chat)
        specs = {"tuned": tuned, "untuned": untuned} if tuned is not None else {}
        if not remote:
            specs = {"large": large, **specs}
        reward_models = [s for s in scorers if isinstance(s, (RewardModel, ProcessRewardModel))]
        rm_roles = ["reward_model" if i == 0 else f"reward_model_{i + 1}"
                    for i in range(len(reward_models))]
        cache = {}
        # (the large model's checkpoint in FP8 as it loads; the small models' as they are)
        self.models = {role: load_role(spec, role, config.dtype, config.device, cache,
                                       quantization=config.quantization if role == "large"
                                       else None)
                       for role, spec in specs.items()}
        for role, rm in zip(rm_roles, reward_models):
            self.models[role] = load_role(rm.model, role, config.dtype, config.device, cache,
                                          head=model_head(rm))
        if chat:    # refused now, naming the model, not on every request
            for role in ("large", "tuned", "untuned"):
                m = self.models.get(role)
                if m is not None and not getattr(m.tokenizer, "chat_template", None):
                    raise ValueError(
                        f"chat=True renders every model's prompts with its chat template, and "
                        f"the {role} model {m.spec!r} has none: leave chat off and give text "
                        f"templates (templates={{'{role}': '...{{prompt}}...'}}; the w2s "
                        f"command: --{role}-template without --chat)")
            for role in ("tuned", "untuned"):
                m = self.models.get(role)
                change = m and generation_prompt_change(m.tokenizer)
                if change:
                    log.warning(
                        "the %s model %s: its chat template opens the assistant's turn with "
                        "%r when asked for a reply (add_generation_prompt), but renders a "
                        "reply's turn as %r; the small models score a response after the "
                        "former, as the large model wrote it, so the reward differs from "
                        "that of apply_chat_template's rendering of the reply%s", role, m.spec,
                        *change, " (an empty reasoning block, Qwen3's: chat_template_kwargs="
                        "{'enable_thinking': False} renders both alike)"
                        if "<think>" in change[1] else "")

        if remote and config.quantization:
            raise ValueError(f"EngineConfig.quantization={config.quantization!r} quantizes a "
                             "local large model's weights, and this one is a black box behind "
                             "its server: quantize it there (vLLM's --quantization), and leave "
                             "quantization None here")
        # (quantize_fp8's counts where the large model is in FP8, else None)
        self.quantized = (self._quantize_large_fp8() if config.quantization == "fp8"
                          and not remote else None)
        # Every pool has the same number of blocks; one block of each together fits the budget.
        # Each pool is in its model's own dtype (a (model, tokenizer) pair keeps the one it
        # came in).
        bytes_per_block = sum(ModelShape.of(m.model).kv_bytes_per_block(config.block_size,
                                                                        m.model.dtype)
                              for m in self.models.values())
        graphs = config.cuda_graphs and not remote
        # EFT steps the small models a token at a time: they get graphs too, for fewer rows,
        # when they could run it (one vocabulary with the large model).
        eft_graphs = graphs and tuned is not None and all(
            self.models[r].tokenizer.get_vocab() == self.models["large"].tokenizer.get_vocab()
            for r in ("tuned", "untuned"))
        eft_batch = min(EFT_GRAPH_MAX_BATCH, config.cuda_graph_max_batch)
        dtype_of = {role: m.model.dtype for role, m in self.models.items()}   # their own
        # fp32 matmuls at full precision wherever a model runs in fp32 (a pair in memory keeps
        # its dtype, whatever config.dtype says).
        self.matmul_dtype = (torch.float32 if torch.float32 in dtype_of.values()
                             else config.dtype)
        graph_bytes = (ModelShape.of(self.models["large"].model).decode_activation_bytes(
            config.cuda_graph_max_batch, dtype_of["large"]) if graphs else 0)
        if eft_graphs:
            graph_bytes += sum(ModelShape.of(self.models[r].model).decode_activation_bytes(
                eft_batch, dtype_of[r]) for r in ("tuned", "untuned"))
        # Every runner gets extend graphs: the scorers' (the small pair, reward models) for
        # their chunks and prefills, the large model's for its prefills (a black box's
        # scorers too).
        scoring_roles = [role for role in self.models if role != "large" or graphs]
        scoring_tokens = min(SCORING_GRAPH_MAX_TOKENS, config.max_batch_tokens)
        scoring_graphs = config.cuda_graphs and scoring_tokens >= 2
        for role in scoring_roles if scoring_graphs else ():
            shape = ModelShape.of(self.models[role].model)
            graph_bytes += (shape.extend_activation_bytes(scoring_tokens, dtype_of[role])
                            + ScoringGraphs.static_bytes(
                                scoring_tokens, SCORING_GRAPH_MAX_ROWS,
                                context_blocks(shape.max_positions, config.block_size)))
        num_blocks = pool_blocks(bytes_per_block, config.num_kv_blocks,
                                 config.kv_cache_memory_bytes, config.device,
                                 config.kv_cache_memory_fraction, config.cpu_kv_cache_bytes,
                                 other_bytes=graph_bytes)
        # The probe and the graphs' capture run as the steps will: fp32 at full precision.
        with full_fp32_matmuls(self.matmul_dtype):
            self.runners = {role: ModelRunner(m.model, num_blocks, config.block_size,
                                              compile=config.torch_compile,
                                              fuse=config.fused_ops)
                            for role, m in self.models.items()}
            if graphs:
                runner = self.runners["large"]
                runner.graphs = DecodeGraphs(runner, config.cuda_graph_max_batch,
                                             capture=runner.device.type == "cuda",
                                             cascade=config.cascade_attention)
            for role in scoring_roles if scoring_graphs else ():
                runner = self.runners[role]
                runner.scoring_graphs = ScoringGraphs(runner, scoring_tokens, scoring_tokens,
                                                      SCORING_GRAPH_MAX_ROWS,
                                                      capture=runner.device.type == "cuda")
        self.budget = KVBudget(num_blocks, config.block_size)
        # Async scheduling: a scoring queued behind a decode step, read the next step
        # (_launch_scoring); and how many were.
        self.scoring_ahead: ScoringLaunch | None = None
        self.scorings_ahead = 0
        if remote:
            self.large = RemoteLarge(remote)
        else:
            m = self.models["large"]
            self.large = LocalLarge(self.runners["large"], m.tokenizer,
                                    eos_ids(m.model, m.tokenizer),
                                    BlockManager(num_blocks, config.block_size,
                                                 config.prefix_caching),
                                    config.async_scheduling)
        pair = {role: (self.runners[role], self.models[role].tokenizer)
                for role in ("tuned", "untuned") if role in self.models}
        implicit = next((s for s in scorers if isinstance(s, ImplicitReward)), ImplicitReward())
        self.scorer = Scorer(
            pair, self.templates, self.budget,
            None if remote else self.large.tokenizer.get_vocab(), config.small_special_tokens,
            config.max_batch_tokens, implicit.weight,
            [reward_model_parts(rm, role, self.runners[role], self.models[role])
             for role, rm in zip(rm_roles, reward_models)], config.prefix_caching)
        # EFT mixes logits token by token: one vocabulary for all three, one small stream,
        # and LM heads that cover it. Otherwise, why a request for it is refused.
        self.eft_refusal = self._eft_refusal(remote)
        if self.eft_refusal is None:
            self.large.eft = EFT(self.scorer.eft_stream, len(self.large.tokenizer),
                                 implicit.weight)
            if eft_graphs:
                for runner in self.scorer.eft_stream.runners.values():
                    with full_fp32_matmuls(self.matmul_dtype):
                        runner.graphs = DecodeGraphs(runner, eft_batch,
                                                     capture=runner.device.type == "cuda")
        self.kv = KVSpace(self.large.blocks, self.scorer.blocks)
        if self.large.blocks is not None:
            self.budget.add_pool("large")
        for i in range(len(self.scorer.streams)):
            self.budget.add_pool(i)
        self.scheduler = Scheduler(self.budget, self.kv, list(self.runners), config.max_waiting,
                                   config.max_batch_tokens)
        self.next_request_id = 0
        if config.freeze_gc:
            freeze_loaded_objects()   # full collections skip what was loaded (frozen_heap.py)

    def _eft_refusal(self, remote) -> str | None:
        """Why this engine cannot run EFT (None: it can)."""
        if remote:
            return ("method='eft' mixes the large model's next-token logits with the small "
                    "pair's, and a black-box large model gives only text: use cbs or best_of_n")
        if self.scorer.eft_stream is None:
            return ("method='eft' needs the implicit reward alone as the scorer, and the large, "
                    "tuned and untuned models to share one vocabulary (and the small models one "
                    "template); these do not: use cbs or best_of_n")
        vocab = len(self.large.tokenizer)
        for role in ("large", "tuned", "untuned"):
            rows = self.runners[role].shape.vocab_size
            if rows < vocab:
                return (f"method='eft' needs each model's LM head to cover the tokenizer's {vocab} "
                        f"tokens, and the {role} model's has {rows} rows (its embeddings were not "
                        "resized for added tokens?): use cbs or best_of_n")
        return None

    @property
    def has_scorer(self) -> bool:
        return bool(self.scorer.streams)

    @property
    def large_tokenizer(self):
        return self.large.tokenizer

    # ---- requests --------------------------------------------------------------------------

    def make_request(self, prompt, params: SearchParams, stream: bool = False, *,
                     chat: bool | None = None, prompt_ids=None,
                     continue_final_message: bool = False,
                     chat_template_kwargs: dict | None = None,
                     logprobs: int | None = None,
                     fit_max_new_tokens: bool = False) -> SearchRequest:
        """Validate, template and tokenize one request, and size its KV reservation (raises
        TypeError or ValueError saying what to change). Thread-safe: it reads no state that a
        step changes, so the server runs it off the engine thread; enqueue() then queues it.
        stream: after every step, the text that became final is in the request's `deltas`.
        chat: False renders a string prompt with the text templates even where the engine
        renders chat templates (OpenAI's completions endpoint); None: the engine's rule.
        prompt_ids: the large model's prompt as token ids, which it reads as they are (where
        its template is '{prompt}'); `prompt` is then their text, for the small models.
        continue_final_message: chat messages whose last is the assistant's; the response
        continues its text (an assistant prefill, vLLM's option) rather than a new turn.
        chat_template_kwargs: the chat templates' own variables (vLLM's option), e.g.
        {"enable_thinking": False} for Qwen3; every model that renders the prompt with its
        chat template gets them (a text template has none).
        logprobs: each returned token's log-probability under the large model (its raw
        distribution) and this many most likely alternatives (0 to MAX_LOGPROBS), in each
        hypothesis's `logprobs`; None: none.
        fit_max_new_tokens: params.max_new_tokens is a cap, lowered to the room the prompt
        leaves in every model's context (a server's default where the client sent no
        max_tokens, as vLLM's); False: a response that may not fit is refused."""
        params = self._checked_params(params)
        prompt = check_prompt(prompt, tool_role=self._tool_role())
        _check_continued(prompt, continue_final_message)
        check_logprobs(logprobs)
        template_kwargs = check_template_kwargs(chat_template_kwargs)
        if logprobs is not None and self.large.blocks is None:
            raise InvalidParam("logprobs", logprobs, "the large model is a black box behind "
                               "another server here; its log-probs are not available: leave "
                               "logprobs out")
        template = self.templates["large"].rendered_as(chat)
        # The contexts must hold the prompt and max_new_tokens; fitting, the prompt and one.
        needs = 1 if fit_max_new_tokens else params.max_new_tokens
        if prompt_ids is None:
            large_text = template.apply(self.large.tokenizer, prompt, continue_final_message,
                                        template_kwargs)
            large_ids = self.large.encode_prompt(large_text, not template.chat, needs)
        else:
            large_ids = self._prompt_ids(prompt_ids, template, needs)
            large_text = self.large.tokenizer.decode(large_ids)
        small_prompts = (self.scorer.prompts(prompt, needs, chat, continue_final_message,
                                             template_kwargs)
                         if params.uses_small_models else [])
        if fit_max_new_tokens:
            rooms = [self.scorer.context_room(small_prompts)] if small_prompts else []
            if "large" in self.runners and self.runners["large"].shape.max_positions:
                rooms.append(self.runners["large"].shape.max_positions - len(large_ids))
            room = min((r for r in rooms if r is not None), default=params.max_new_tokens)
            if room < params.max_new_tokens:
                params.max_new_tokens = room
                params.validate()     # (min_tokens past the room: refused, naming it)
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        req = SearchRequest(-1, prompt, params, seed, large_ids, small_prompts,
                            large_prompt_text=large_text,
                            reported_stream=self.scorer.reported_stream)
        req.stats.prompt_tokens = len(large_ids)
        req.logprobs = logprobs
        if params.bad_words:   # (a black box refused them: check_params)
            req.bad_word_ids = self.large.bad_word_ids(params.bad_words)
            self.large.check_bans(params, req.bad_word_ids)
        if params.structured_output is not None:
            req.grammar = self.large.compile_guide(params.structured_output)
        if stream:
            req.stream = FinalText(params.method, params.stop)
        large_len = None if self.large.blocks is None else len(large_ids)
        smalls = [(len(sp.ids), self.scorer.shared[i], len(sp.suffix_ids))
                  for i, sp in enumerate(small_prompts)]
        req.reserved = self.budget.reservation(*params.tree, params.max_new_tokens,
                                               params.chunk_len, large_len, smalls)
        capacity = self.budget.num_blocks
        if any(v > capacity for v in req.reserved.values()):
            # The prompt alone, with one sample of one token, does not fit: name the prompt.
            least = self.budget.reservation(1, 1, 1, 1, large_len, smalls)
            if any(v > capacity for v in least.values()):
                raise InvalidParam("prompt", len(large_ids), "needs more KV memory", message=(
                    f"the prompt ({len(large_ids)} tokens of the large model's) needs up to "
                    f"{max(least.values())} KV blocks in one pool even for one token, and a "
                    f"pool holds {capacity} ({capacity * self.config.block_size} tokens): "
                    "shorten the prompt, or give the engine more KV memory"))
            samples = {"cbs": "w*k", "best_of_n": "N"}.get(params.method, "n")
            # The field to change: the samples where a one-token response does not fit either.
            one = self.budget.reservation(*params.tree, 1, 1, large_len, smalls)
            if any(v > capacity for v in one.values()):
                field, value = {"cbs": ("w", params.w), "best_of_n": ("k", params.k)}.get(
                    params.method, ("n", params.k))
                lower = f"{samples} ({params.candidates}), which does not fit even for one token"
            else:
                field, value = "max_new_tokens", params.max_new_tokens
                lower = (f"{samples} ({params.candidates}) or max_new_tokens "
                         f"({params.max_new_tokens})")
            raise InvalidParam(field, value, "needs more KV memory", message=(
                f"request needs up to {max(req.reserved.values())} KV blocks in one pool, which "
                f"holds {capacity}: lower {lower}, or give the engine more KV memory"))
        return req

    def _checked_params(self, params: SearchParams) -> SearchParams:
        """A validated copy of params that this engine can run, whatever the prompt (raises
        InvalidParam, ValueError or TypeError saying what to change)."""
        if not isinstance(params, SearchParams):
            raise TypeError(f"params: expected a SearchParams, got {type(params).__name__}")
        params = params.copy()
        params.validate()
        if params.uses_small_models and not self.has_scorer:
            raise ValueError(f"method={params.method!r} needs a scorer: pass tuned and untuned "
                             "small models (or scorer=RewardModel(...)) to Engine(...), or use "
                             "SearchParams.base()")
        if params.method != "eft" and params.beta != 1.0:
            # As the server and the w2s command refuse it: a setting that would do nothing.
            raise InvalidParam("beta", params.beta, "only method='eft' uses beta (the weight "
                               "of the small pair's logits): leave it at 1.0 or use "
                               "SearchParams.eft(beta=...)", "SearchParams.")
        if params.method == "eft" and self.eft_refusal is not None:
            raise InvalidParam("method", "eft", "", message=self.eft_refusal)
        self.large.check_params(params)
        return params

    def _prompt_ids(self, ids, template, max_new_tokens: int) -> list[int]:
        """Token ids the large model reads as they are, checked."""
        if self.large.blocks is None:
            raise ValueError("prompt_ids: the large model is a black box behind another "
                             "server, which reads text: send the prompt as text")
        if not template.is_identity:
            raise ValueError("prompt_ids: the large model's template wraps the prompt's text "
                             f"({template.text!r}{', chat' if template.chat else ''}); token "
                             "ids go in as they are only under the template '{prompt}'")
        vocab = len(self.large.tokenizer)
        if not isinstance(ids, (list, tuple)) or not ids:
            raise InvalidParam("prompt", ids, "must be a non-empty list of token ids")
        for i, t in enumerate(ids):
            if not (isinstance(t, int) and not isinstance(t, bool)) or not 0 <= t < vocab:
                raise InvalidParam(f"prompt.{i}", t, f"must be a token id in [0, {vocab})")
        check_context("large", self.runners["large"].shape.max_positions, len(ids),
                      max_new_tokens)
        return list(ids)

    def large_prompt_ids(self, prompt, chat: bool | None = None,
                         continue_final_message: bool = False,
                         chat_template_kwargs: dict | None = None) -> list[int]:
        """The large model's token ids of a prompt as a search of it reads them, its template
        applied (chat: make_request's), its context not checked: vLLM's /tokenize. Thread-safe,
        as make_request."""
        if self.large.blocks is None:
            raise ValueError("the large model is a black box behind another server, which "
                             "tokenizes its prompts itself: there are no token ids here")
        prompt = check_prompt(prompt, tool_role=self._tool_role())
        _check_continued(prompt, continue_final_message)
        template = self.templates["large"].rendered_as(chat)
        text = template.apply(self.large.tokenizer, prompt, continue_final_message,
                              check_template_kwargs(chat_template_kwargs))
        return encode(self.large.tokenizer, text, not template.chat)

    def _tool_role(self) -> bool:
        """Chat messages may have role 'tool' when every model renders them with a chat
        template that has one (a plain-text template knows system, user and assistant)."""
        if not self.templates["large"].chat:
            return False
        tokenizers = [self.large.tokenizer] + list(self.scorer.tokenizers)
        return all(template_has_tool_role(t) for t in tokenizers)

    @property
    def max_prompt_tokens(self) -> int | None:
        """The smallest context of the models here (None where none says): no prompt is longer."""
        limits = [r.shape.max_positions for r in self.runners.values() if r.shape.max_positions]
        return min(limits) if limits else None

    def add_request(self, prompt, params: SearchParams) -> SearchRequest:
        return self.enqueue(self.make_request(prompt, params))

    @one_thread
    def enqueue(self, req: SearchRequest, bounded: bool = True) -> SearchRequest:
        """Queue a request made by make_request (raises QueueFull past max_waiting requests
        waiting for KV memory, if bounded). On the thread driving the engine (another's
        call raises EngineBusy)."""
        if req.request_id != -1 or req.status is not RequestStatus.WAITING:
            raise ValueError(f"this request was queued before (search {req.request_id}, "
                             f"{req.status.name.lower()}): make a new one with make_request")
        req.request_id = self.next_request_id
        try:
            self.scheduler.add(req, bounded)
        except BaseException:
            req.request_id = -1   # refused: its id goes to the next request, not to it
            raise
        self.next_request_id += 1
        return req

    @one_thread
    def cancel(self, req: SearchRequest):
        """Drop a request wherever it is; its blocks return to the pools."""
        if not isinstance(req, SearchRequest):
            raise TypeError(f"cancel: expected the SearchRequest that add_request or enqueue "
                            f"returned, got {type(req).__name__}")
        self._drop(req)

    def _drop(self, req: SearchRequest):
        self.scheduler.cancel(req)
        self.large.drop(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop --------------------------------------------------------------------------

    @one_thread
    @torch.inference_mode()   # no autograd records anywhere in a step (the reward math too)
    @exact_fp32
    def step(self) -> list[SearchRequest]:
        """One engine step; returns the requests that ended in it (done or failed, and those
        cancelled since the last step).

        An error is kept to the requests it touched: select and finish run per request, and
        a prefill, decode or scoring batch that fails is run again one request at a time, so
        only the request that causes it fails; where a batch cannot be put back as it was
        (part-way through copy-on-write), the requests in it fail (their blocks come back)
        and the waiting ones go on."""
        self.scheduler.schedule()
        prefilling = self.scheduler.prefilling()
        if prefilling:
            with record_function("w2s.prefill"):
                self._prefill(prefilling)
        running = [r for r in self.scheduler.running if r.status is RequestStatus.RUNNING]
        with record_function("w2s.large"):
            failed = self._run_batch("the large model's step", self.large.advance, running)
        for r, message in failed:
            self.scheduler.fail(r, message)
        ahead, self.scoring_ahead = self.scoring_ahead, None
        if ahead is not None:
            with record_function("w2s.score"):
                self._finish_scoring(ahead)
            self._select(ahead.requests)
        ready = [r for r in self.scheduler.running if r.chunk_complete]
        if ready and self.config.scoring_ahead and self.large.runs_ahead:
            with record_function("w2s.score"):
                ready = self._launch_scoring(ready)
            self._select(ready)
        elif ready:
            self._score_in_parts(ready)
        self._fail_one_if_all_wait_for_room()
        ended = self.scheduler.take_ended()
        self._stream(ended)
        return ended

    def _run_batch(self, where: str, run, items: list, request_of=lambda item: item,
                   alone=None):
        """run(items) -> the requests that failed, with why. When the batch fails with every
        sequence put back as it was (BatchFailed.retryable), each item runs again alone
        (alone([item]), run's by default), so only the request that causes it fails (and a
        batch too large for the device's memory still finishes); otherwise the batch's
        requests fail."""
        alone = alone or run
        try:
            return run(items)
        except BatchFailed as e:
            if not e.retryable or len(items) == 1:
                message = self._engine_error(where, e.__cause__ or e)
                return [(request_of(item), message) for item in items]
            log.warning("w2s engine: %s of %d requests failed (%s: %s); running each alone",
                        where, len(items), type(e.__cause__).__name__, e.__cause__)
        except Exception as e:
            message = self._engine_error(where, e)
            return [(request_of(item), message) for item in items]
        failed = []
        for item in items:
            try:
                failed += alone([item])
            except Exception as e:
                failed.append((request_of(item), self._engine_error(where, e.__cause__ or e)))
        return failed

    def _stream(self, ended: list[SearchRequest]):
        """Each streaming request's text that became final in this step (search/stream.py)."""
        for r in self.scheduler.running + ended:
            if r.stream is None:
                continue
            try:
                if r.status is RequestStatus.RUNNING:
                    r.deltas += r.stream.update(r.beams, self.large.response_text)
                elif r.status is RequestStatus.DONE:
                    r.deltas += r.stream.finish(r.result)
            except Exception as e:
                message = self._engine_error("streaming", e)
                if r.status is RequestStatus.RUNNING:
                    self.scheduler.fail(r, message)
                else:   # its result stands: the stream still ends with it
                    r.deltas.append(SearchDelta("", 0, r.result))

    def _engine_error(self, where: str, e: Exception) -> str:
        """Log an unexpected error with its traceback; the message its requests fail with."""
        log.exception("w2s engine: %s failed; the requests in it fail, the engine goes on", where)
        return f"engine error in {where}: {type(e).__name__}: {e}"

    def _prefill(self, requests: list[SearchRequest]):
        for r, message in self._run_batch("prefill", self._prefill_chunk, requests,
                                          alone=self._prefill_whole):
            self.scheduler.fail(r, message)

    def _prefill_whole(self, requests: list[SearchRequest]) -> list:
        """After a prefill batch failed (every request in it back to admitted): one request's
        whole prompt, a chunk at a time, so that a prompt whose later chunk fails fails now,
        alone, rather than each step's batch failing again and starting every request over."""
        (r,) = requests
        while r.status is RequestStatus.PREFILLING:
            self._prefill_chunk([r])
        return []

    def _prefill_chunk(self, requests: list[SearchRequest]) -> list:
        """The next chunk of the prompts being prefilled (max_batch_tokens in all per model:
        one forward each, so that a long prompt delays the others' decode by one chunk at
        most); the requests whose prompts are in, in every model, fork their roots into W*K
        children and run from this step. If it fails, every request starts over as admitted
        (no blocks, beam ids, which seed sampling, from 0), so that each can run again alone."""
        try:
            for r in requests:
                if r.root is None:
                    # (a structured output's matcher: a local large model's only)
                    r.root = Beam(beam_id=r.new_beam_id(), token_ids=[],
                                  large=self.large.new_table(),
                                  guide=None if r.grammar is None else self.large.new_guide(r))
            budget = self.config.max_batch_tokens
            # (named apart: a profile charges the device's idle time to the innermost phase)
            with record_function("w2s.prefill.large"):
                large_in = self.large.prefill(requests, budget)
            with record_function("w2s.prefill.small"):
                small_in = {id(r) for r in self.scorer.prefill(
                    [r for r in requests if r.params.uses_small_models], budget)}
            with record_function("w2s.prefill.fork"):
                for r in large_in:
                    if not r.params.uses_small_models or id(r) in small_in:
                        r.start(self.kv)
        except Exception as e:
            for r in requests:
                r.start_over(self.kv)   # its prompt's work is redone from the start
                r.status = RequestStatus.PREFILLING
            raise BatchFailed(retryable=True) from e
        return []

    def _select(self, requests: list[SearchRequest]):
        """Each scored request keeps its top W and forks its next chunk, or ends."""
        # A new record_function per call: as a decorator one instance serves every call (and
        # thread), which its enter and exit do not allow.
        with record_function("w2s.select"):
            for r in requests:
                if r.status is not RequestStatus.RUNNING or r.waits_for_room:
                    continue    # (one waiting for room is not scored: it selects later)
                try:
                    if r.select(self.kv):
                        r.finish(self.large.response_text)
                        self.scheduler.finish(r)
                except Exception as e:
                    self.scheduler.fail(r, self._engine_error("selection", e))

    def _plan(self, ready: list[SearchRequest]) -> list:
        """The scoring updates of the requests whose chunks are complete: (request, updates)
        each; a request that cannot be scored fails here, alone."""
        plans = []
        with record_function("w2s.score.plan"):
            for r in ready:
                if not r.params.uses_small_models:
                    continue  # base is not scored
                r.waits_for_room = None
                try:
                    if r.params.method == "eft":   # scored as it sampled, but for stop cuts
                        ups = self.scorer.plan_cut_samples(r, self.large)
                        if ups:
                            plans.append((r, ups))
                    else:
                        plans.append((r, self.scorer.plan(r, self.large)))
                except NoRoomYet as e:   # tried again next step, when room may be free
                    r.waits_for_room = f"ValueError: {e}"   # (what it fails with, if it does)
                except Exception as e:  # a bad request fails alone
                    self.scheduler.fail(r, f"{type(e).__name__}: {e}")
        return plans

    def _fail_one_if_all_wait_for_room(self):
        """A request waits for KV room only while another can end and free it (admissions
        pause meanwhile: Scheduler.schedule). When every running request waits and none
        ended in this step (whose room they try next step), none will: the last admitted
        that has streamed no text is preempted (back to the head of the queue, recomputed
        later from its prompt) and its reservation goes to the others; one waiting alone
        fails, and so does the last admitted where every one has streamed text already (a
        recomputed search equals it only up to rounding, and a stream's text is never taken
        back)."""
        running = [r for r in self.scheduler.running if not r.status.ended]
        waiting = [r for r in running if r.waits_for_room]
        if waiting and len(waiting) == len(running) and not self.scheduler.ended_in_step:
            # The last admitted that has streamed nothing is preempted, whatever the later
            # ones streamed: a stream's text is never taken back, but a request that sent none
            # can give its room to the others and run again; only where every one streamed
            # does the last admitted fail.
            quiet = [r for r in waiting if r.stream is None or not any(r.stream.sent.values())]
            if len(waiting) > 1 and quiet:
                self.scheduler.preempt(quiet[-1])
            else:
                r = waiting[-1]
                self.scheduler.fail(r, r.waits_for_room)

    def _record_peaks(self, requests: list[SearchRequest]):
        """Each running request's blocks at its chunk's end, scored: its peak moment."""
        for r in requests:
            if r.status is RequestStatus.RUNNING:
                r.record_peak(self.scorer.stream_roles)

    def _run_scoring(self, plans: list):
        """Score the plans now (the batch, or each request alone if the batch fails)."""
        def run(plans):
            self.scorer.run(plans)
            return []   # a stream that went through adds nothing when it runs again
        for r, message in self._run_batch("scoring", run, plans, lambda plan: plan[0]):
            self.scheduler.fail(r, message)

    def _launch_scoring(self, ready: list[SearchRequest]) -> list[SearchRequest]:
        """Async scheduling, with a decode step of other requests in flight: queue the
        scoring behind it and read it next step, after that step's decode is launched, so
        the device never waits for the host's reading, selecting and forking (these requests
        start their next chunk a step later). Returns the ready requests to select now:
        those not scored (plain sampling, EFT), or all of them if the launch failed (scored
        now, each alone if need be)."""
        self.scoring_ahead, now = self._launch_plans(ready)
        self.scorings_ahead += self.scoring_ahead is not None
        return now

    def _launch_plans(self, ready: list[SearchRequest]) \
            -> tuple[ScoringLaunch | None, list[SearchRequest]]:
        """Plan and launch the scoring of these requests, reading nothing: (the launch, to be
        finished, or None; the requests that need no reading: those not scored, or all of
        them if the launch failed, scored now, each alone if need be)."""
        plans = self._plan(ready)
        try:
            launched = self.scorer.launch(plans) if plans else None
        except Exception:
            self._run_scoring(plans)     # rolled back: scored now, as without a launch
            self._record_peaks(ready)
            return None, ready
        scored = {id(r) for r, _ in plans}
        now = [r for r in ready if id(r) not in scored]
        self._record_peaks(now)
        return launched, now

    def _score_in_parts(self, ready: list[SearchRequest]):
        """Score the requests whose chunks ended and select their survivors, with no decode
        step in flight to hide the host's work behind (requests in step: a batch of prompts,
        or waiting scheduling). In one batch the device would idle while the host plans and
        packs the scoring, and again while it reads the rewards, selects, forks and packs the
        next decode (on an H200 at 111ea9f 16 requests' chunk ends cost some 40 ms more than
        the scorers' arithmetic). So the requests are scored in parts, each launched before
        the one before it is read: the device computes a part while the host plans the next,
        or selects the last. Each request's scoring and selection are its own, so the results
        are those of one batch."""
        parts = scoring_parts(ready, self.config.scoring_parts)
        launched = []
        for part in parts:
            with record_function("w2s.score"):
                launched.append(self._launch_plans(part))
        for (scoring, _), part in zip(launched, parts):
            if scoring is not None:
                with record_function("w2s.score"):
                    self._finish_scoring(scoring)
            self._select(part)

    def _finish_scoring(self, ahead: ScoringLaunch):
        """Read a scoring launched the step before and set its requests' rewards. A failed
        read (rolled back) is handled as _run_batch handles a failed batch: each request
        still running is scored again alone when the batch could be put back, else fails."""
        # A request that ended (cancelled) while its scoring ran: its counts went into the
        # totals when it ended, so what this read adds to it goes there too.
        ended = {id(r): (r, dict(r.stats.tokens_forwarded)) for r, _ in ahead.plans
                 if r.status is not RequestStatus.RUNNING}
        try:
            self.scorer.finish(ahead)
        except Exception as e:
            live = [plan for plan in ahead.plans if plan[0].status is RequestStatus.RUNNING]
            retry = isinstance(e, BatchFailed) and e.retryable and len(live) > 1
            if retry:
                log.warning("w2s engine: scoring of %d requests failed (%s: %s); running each "
                            "alone", len(live), type(e.__cause__).__name__, e.__cause__)
            for plan in live:
                if retry:
                    self._run_scoring([plan])
                else:
                    cause = e.__cause__ if isinstance(e, BatchFailed) and e.__cause__ else e
                    self.scheduler.fail(plan[0], self._engine_error("scoring", cause))
        for r, before in ended.values():
            for role, n in r.stats.tokens_forwarded.items():
                totals = self.scheduler.totals.tokens
                totals[role] = totals.get(role, 0) + n - before.get(role, 0)
        self._record_peaks(ahead.requests)

    def _quantize_large_fp8(self) -> dict:
        """EngineConfig.quantization='fp8': the large model's linears in FP8, before its runner
        merges them and the KV pools take the memory they free (quantize_fp8's counts)."""
        large = self.models["large"].model
        shared = next((role for role, m in self.models.items()
                       if role != "large" and m.model is large), None)
        if shared is not None:
            raise ValueError(f"quantization='fp8' quantizes the large model, and it is the same "
                             f"module as the {shared} model, whose rewards would change with "
                             f"it: give the {shared} model its own copy, or leave quantization "
                             "None")
        counts = quantize_fp8(large)
        if counts["layers"] == 0:
            raise ValueError(f"quantization='fp8': the large model {self.models['large'].spec!r} "
                             "has no linear layer the FP8 GEMM takes (torch's nn.Linear with "
                             "sizes that are multiples of 16): leave quantization None")
        if large.device.type == "cuda":
            torch.cuda.empty_cache()       # the bf16 weights' memory, for the KV pools
        log.info("fp8: %d linear layers of the large model quantized (%d kept), weights "
                 "%.2f GB -> %.2f GB", counts["layers"], counts["kept"],
                 counts["bytes_before"] / 1e9, counts["bytes_after"] / 1e9)
        return counts

    # ---- the API ---------------------------------------------------------------------------

    @one_thread
    def search(self, prompts, params: SearchParams | None = None, *,
               continue_final_message: bool = False,
               chat_template_kwargs: dict | None = None,
               logprobs: int | None = None) -> list[SearchResult]:
        """Run one search per prompt, all batched together; results in prompt order. prompts:
        a text, one conversation (a list of {"role", "content"} messages), or a list of
        either. continue_final_message: each conversation ends with an assistant message whose
        text the response continues; chat_template_kwargs: the chat templates' variables;
        logprobs: each token's log-probability and this many alternatives in the hypotheses
        (make_request)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Iterable) or isinstance(prompts, (bytes, dict)):
            raise TypeError(f"prompts: expected a str or a list of prompts (each a str or chat "
                            f"messages), got {type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt")
        if all(isinstance(p, dict) for p in prompts):
            prompts = [prompts]      # one conversation's messages, not a list of prompts
        # (None is the defaults; a falsy wrong type, {} or 0, is refused below, not replaced)
        params = SearchParams() if params is None else params
        # What is wrong whatever the prompt is refused once, as it is (an InvalidParam keeps
        # its field), not as prompt 0's.
        self._checked_params(params)
        check_logprobs(logprobs)
        check_template_kwargs(chat_template_kwargs)
        requests = []
        for i, p in enumerate(prompts):
            try:
                requests.append(self.make_request(
                    p, params, continue_final_message=continue_final_message,
                    chat_template_kwargs=chat_template_kwargs, logprobs=logprobs))
            except (ValueError, TypeError) as e:
                named = f"prompt {i}: {e}"
                if type(e).__str__ is BaseException.__str__:   # its text is its args
                    e.args = (named,)        # the same error (type, InvalidParam's field)
                    raise
                raise (TypeError if isinstance(e, TypeError) else ValueError)(named) from e
        # No tqdm at all without a bar: even a disabled one starts tqdm's monitor thread,
        # which a host program that embeds the engine did not ask for.
        bar = (tqdm(total=len(requests), desc=f"w2s {params.method}", unit="prompt")
               if self.config.progress and len(requests) > 1 else None)
        try:
            # A bounded queue (max_waiting) takes the prompts as it has room: a caller that
            # waits for all of them is not turned away.
            queued = self._enqueue_while_room(requests, 0)
            ended = 0
            while ended < len(requests):
                if queued < len(requests) and not self.has_unfinished():
                    raise QueueFull(f"max_waiting={self.config.max_waiting} admits none of "
                                    "the prompts: raise it or pass None (no bound)")
                self.step()
                queued = self._enqueue_while_room(requests, queued)
                now = sum(r.status.ended for r in requests)
                if bar is not None:
                    bar.update(now - ended)
                ended = now
        except BaseException:
            for r in requests:
                self.cancel(r)
            raise
        finally:
            if bar is not None:
                bar.close()
        errors = {i: r.error for i, r in enumerate(requests) if r.status is RequestStatus.FAILED}
        if errors:
            i, more = next(iter(errors)), len(errors) - 1
            message = f"prompt {i} failed: {errors[i]}"
            if more:
                message += f" (and {more} more prompt{'s' * (more > 1)})"
            if len(errors) < len(requests):
                message += "; the other prompts' results are in this error's .results"
            raise SearchError(message, [r.result for r in requests], errors)
        return [r.result for r in requests]

    def _enqueue_while_room(self, requests: list[SearchRequest], queued: int) -> int:
        """Enqueue requests[queued:] until the queue is full -> how many are queued now."""
        while queued < len(requests):
            try:
                self.enqueue(requests[queued])
            except QueueFull:
                break
            queued += 1
        return queued

    def warm_up(self):
        """One small search through the paths a request takes: a prefill, decode steps with
        sampling, and with a scorer a scored chunk and a selection. On a GPU the first call
        of each Triton kernel compiles and autotunes it (seconds in all), and a scoring
        graph shape is captured the first time it is seen: a server runs this before it
        takes requests, so that its first request does not wait for them. With a black-box
        large model only the scorer's path runs (no request goes to the remote server)."""
        if isinstance(self.large, RemoteLarge):
            self.score(["Hello"], [" and welcome"])
        else:
            params = (SearchParams.cbs(2, 2, 2, max_new_tokens=4, ignore_eos=True, seed=0)
                      if self.has_scorer else
                      SearchParams.base(n=2, max_new_tokens=4, ignore_eos=True, seed=0))
            try:
                self.make_request("Hello", params)
            except ValueError:   # a pool too small for it: one sample, one token
                params = params.copy(w=1, k=1, l=None, max_new_tokens=1,
                                     method="best_of_n" if self.has_scorer else "base")
            self.search(["Hello"], params)
        self.check_all_free()

    def search_stream(self, prompt, params: SearchParams | None = None, *,
                      continue_final_message: bool = False,
                      chat_template_kwargs: dict | None = None,
                      logprobs: int | None = None) -> Iterator[SearchDelta]:
        """Run one search and yield its text as it becomes final (SearchDelta); the last
        delta carries the SearchResult. The deltas concatenate to the result's text (for
        plain sampling of n streams: per index, to each hypothesis's text). Bad arguments
        raise here, at the call, as search() raises them; the search starts at the first
        delta asked for."""
        # Checked before a generator is returned (make_request is thread-safe): a host that
        # hands the stream to a streaming response learns of a bad argument before the
        # response begins, not half-way through it.
        req = self.make_request(prompt, SearchParams() if params is None else params,
                                stream=True, continue_final_message=continue_final_message,
                                chat_template_kwargs=chat_template_kwargs, logprobs=logprobs)
        return self._stream_deltas(req)

    def _stream_deltas(self, req: SearchRequest) -> Iterator[SearchDelta]:
        # Claimed until it ends or is closed: an open generator, left half-read, keeps the
        # engine its thread's, and another thread's call is told how to let go of it.
        with self.one_thread.claim("Engine.search_stream() (until its generator is exhausted "
                                   "or closed: g.close())"):
            self.enqueue(req)
            try:
                while not req.status.ended:
                    self.step()
                    yield from req.deltas
                    req.deltas = []
            finally:
                # The caller stopped early (or an error): drop it. Not cancel(), which
                # claims: a generator left open is closed by the garbage collector, on any
                # thread, and this claim is held until then.
                if not req.status.ended:
                    self._drop(req)
        if req.status is RequestStatus.FAILED:
            raise SearchError(f"the search failed: {req.error}")

    @one_thread
    @torch.inference_mode()
    @exact_fp32
    def score(self, prompts, responses, finished=True, continue_final_message: bool = False,
              chat_template_kwargs: dict | None = None) -> list[float]:
        """The reward of given responses under the engine's scorer (texts, or token ids in the
        scorers' one vocabulary). A process reward model whose steps are the search's chunks
        (step_separator=None) sees a given response as one step: there are no chunks here.
        finished: the response ended, so the small models also score their tokenizer's
        eos_token after it (a search scores the EOS id it sampled, which may be another). To
        check a search's reward, pass its own flag, finished=result.finished: a response cut
        by max_new_tokens is scored without EOS, and the default True adds that term. Under a
        chat template the EOS scored is the template's end of turn (<end_of_turn>, <|end|>,
        ...: SmallPrompt.end_id) where that is not the eos_token.
        continue_final_message, chat_template_kwargs: search()'s, to render each prompt as a
        search with them did (a prefilled assistant message continued, not a new turn after
        it; Qwen3's enable_thinking), so that its reward is reproduced."""
        if not self.has_scorer:
            raise ValueError("score() needs a scorer: the tuned and untuned small models, or "
                             "scorer=RewardModel(...)")
        if isinstance(prompts, str):
            prompts, responses = [prompts], [responses]
        if not isinstance(prompts, (list, tuple)) or not isinstance(responses, (list, tuple)):
            raise TypeError("score(prompts, responses): expected one prompt and one response, or "
                            "a list of each (a response is a text or a list of token ids), got "
                            f"{type(prompts).__name__} and {type(responses).__name__}")
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        flags = finished if isinstance(finished, (list, tuple)) else [finished] * len(prompts)
        if len(flags) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(flags)} finished flags")
        prompts = [check_prompt(p, tool_role=self._tool_role()) for p in prompts]
        for p in prompts:
            _check_continued(p, continue_final_message)
        return self.scorer.score(prompts, list(responses), list(flags), continue_final_message,
                                 check_template_kwargs(chat_template_kwargs))

    def stats(self) -> dict:
        """Queue, KV and counters, for monitoring (read without locking: it may lag a step):
        waiting, running (requests now); kv_blocks_total (blocks per pool), kv_blocks_used
        (per model role: "large", "tuned", ...; models sharing a pool show its count);
        requests (queued since the start, cancelled ones included), failed; tokens
        (forwarded per model role); cached_tokens (prompt tokens read from the prefix cache
        instead, per model role); score_tokens (the tokens score() calls read: each pair's
        prompt and response, in each scorer stream's tokens); decode_steps; scorings_ahead
        (scorings read a step later, async scheduling). Both per-role token counts are of
        the requests that ended (or were preempted, whose work is done again) and of the
        score() calls."""
        used = {"large": self.large.blocks.num_used if self.large.blocks else 0}
        for stream in self.scorer.streams:
            for role in stream.roles:
                used[role] = stream.blocks.num_used
        t, scored = self.scheduler.totals, self.scorer.scored
        tokens, cached = dict(t.tokens), dict(t.cached)
        for role, n in scored.forwarded.items():
            tokens[role] = tokens.get(role, 0) + n
        for role, n in scored.cached.items():
            cached[role] = cached.get(role, 0) + n
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "kv_blocks_total": self.budget.num_blocks, "kv_blocks_used": used,
                "requests": t.requests, "failed": t.failed, "tokens": tokens,
                "cached_tokens": cached, "score_tokens": scored.tokens,
                "decode_steps": self.large.decode_steps, "scorings_ahead": self.scorings_ahead}

    def check_all_free(self):
        """The invariant after every request: every block of every pool is free (RuntimeError
        naming the pool, and the requests still running or waiting that may hold them)."""
        pools = [("large", self.large.blocks)] if self.large.blocks is not None else []
        pools += [("/".join(s.roles), s.blocks) for s in self.scorer.streams]
        for name, blocks in pools:
            try:
                blocks.check_all_free()
            except RuntimeError as e:
                live = len(self.scheduler.waiting) + len(self.scheduler.running)
                why = (f"{live} request(s) still running or waiting hold them: step() until "
                       "has_unfinished() is False, or cancel them, before checking" if live
                       else "no request is unfinished, so they leaked")
                raise RuntimeError(f"the {name} model's KV pool: {e}; {why}") from None
