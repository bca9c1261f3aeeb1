"""Engine: loads the three models, owns their KV pools, and runs many searches at once.

One step of the engine loop:
1. admit waiting requests whose worst-case KV fits, prefill each prompt once per model, and
   fork the root into W*K children;
2. decode one token for every live beam of every request in one batched large-model forward
   (EFT beams also step both small models), and sample all of them in one kernel call;
3. score every chunk that just completed, all requests together, in one forward per small
   model (search/scorer.py), then select survivors, free losers and fork the next chunk.
"""

import random
from collections import deque
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from w2s_engine.backends.openai_completions import CompletionJob, OpenAICompletions
from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.config import EngineConfig
from w2s_engine.kernels.sampling import sample
from w2s_engine.models.attention import ATTN_IMPLEMENTATION
from w2s_engine.models.runner import ModelRunner, ModelShape
from w2s_engine.outputs import SearchResult
from w2s_engine.params import SearchParams
from w2s_engine.search.prompts import SmallPrompt, encode, parse_templates
from w2s_engine.search.bridge import Detokenizer, Tokenized
from w2s_engine.search.request import KVSpace, SearchRequest, mix_seed
from w2s_engine.search.scorer import SmallStream, StreamUpdate
from w2s_engine.sequence import Beam, SmallState

# Small-model tokens per large-model token that admission reserves KV for when the vocabularies
# differ. Real text runs near 1 (Gemma -> SmolLM2: 1.1); past 4, the reservation grows at run time.
SMALL_TOKENS_PER_LARGE = 4


class SearchError(RuntimeError):
    """A request failed while running; the engine and the other requests went on."""


@dataclass
class _Model:
    model: object
    tokenizer: object
    spec: str


def _load(spec, config: EngineConfig, role: str, cache: dict) -> _Model:
    if isinstance(spec, tuple):
        model, tokenizer = spec
        return _Model(model.to(config.device), tokenizer, type(model).__name__)
    if hasattr(spec, "model") and hasattr(spec, "tokenizer"):  # a LoadedModel
        return _Model(spec.model.to(config.device), spec.tokenizer, getattr(spec, "spec", role))
    if not isinstance(spec, str):
        raise TypeError(f"{role}={spec!r}: pass a model spec string (bundled name, directory, "
                        "GGUF file, LoRA adapter dir) or a (model, tokenizer) pair")
    if spec not in cache:
        from w2s_engine.models.loader import load_model
        loaded = load_model(spec, dtype=config.dtype, device=config.device,
                            attn_implementation=ATTN_IMPLEMENTATION)
        cache[spec] = _Model(loaded.model, loaded.tokenizer, spec)
    return cache[spec]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


class Engine:

    def __init__(self, large, tuned=None, untuned=None, templates: dict | None = None,
                 chat: bool = False, config: EngineConfig | None = None, **overrides):
        self.config = config = (config or EngineConfig(**overrides)).resolve()
        loaded = {}
        # A large model behind an HTTP API is a black box: text in, text out, no KV here.
        self.remote = large if isinstance(large, OpenAICompletions) else None
        self.models = {} if self.remote else {"large": _load(large, config, "large", loaded)}
        if (tuned is None) != (untuned is None):
            raise ValueError("pass both tuned and untuned small models, or neither (base only)")
        if tuned is not None:
            self.models["tuned"] = _load(tuned, config, "tuned", loaded)
            self.models["untuned"] = _load(untuned, config, "untuned", loaded)
        self.templates = parse_templates(templates, chat)
        self.has_small = tuned is not None
        if self.remote and not self.has_small:
            raise ValueError("a black-box large model needs the tuned and untuned small models")
        if self.remote and chat:
            raise ValueError("chat=True needs the large model's tokenizer; with a black-box large "
                             "model pass a template string for 'large' instead")

        num_blocks = self._num_blocks()
        self.runners = {role: ModelRunner(m.model, num_blocks, config.block_size)
                        for role, m in self.models.items()}
        if self.remote:
            self.large_tokenizer, self.large_eos, self.large_blocks = None, set(), None
        else:
            self.large_tokenizer = self.models["large"].tokenizer
            self.detokenizer = Detokenizer(self.large_tokenizer)
            self.large_eos = _eos_ids(self.models["large"].model, self.large_tokenizer)
            self.large_blocks = BlockManager(num_blocks, config.block_size)
        self.num_blocks = num_blocks

        # Small streams: one when both small models read the same tokens, else one each.
        self.streams: list[SmallStream] = []
        self.stream_roles: list[tuple[str, ...]] = []
        if self.has_small:
            t, u = self.models["tuned"], self.models["untuned"]
            same = (t.tokenizer.get_vocab() == u.tokenizer.get_vocab()
                    and self.templates["tuned"] == self.templates["untuned"])
            groups = [("tuned", "untuned")] if same else [("tuned",), ("untuned",)]
            for roles in groups:
                tok = self.models[roles[0]].tokenizer
                self.streams.append(SmallStream({r: self.runners[r] for r in roles},
                                                BlockManager(num_blocks, config.block_size),
                                                tok.eos_token_id))
                self.stream_roles.append(roles)
            large_vocab = None if self.remote else self.large_tokenizer.get_vocab()
            # Shared vocabulary: the sampled ids are scored as they are.
            self.shared_vocab = all(self.models[r[0]].tokenizer.get_vocab() == large_vocab
                                    for r in self.stream_roles)
            self.eft_ok = (len(self.streams) == 1 and self.shared_vocab)
        else:
            self.shared_vocab = self.eft_ok = False
        self.kv = KVSpace(self.large_blocks, [s.blocks for s in self.streams])
        self.reserved = {i: 0 for i in range(len(self.streams))}
        if not self.remote:
            self.reserved["large"] = 0

        self.waiting: deque[SearchRequest] = deque()
        self.running: list[SearchRequest] = []
        self.next_request_id = 0
        self._eft_logprobs = {}
        self._ended: list[SearchRequest] = []   # requests that ended since the last step()
        self.total = {"requests": 0, "failed": 0,
                      "tokens": {role: 0 for role in self.runners}}

    # ---- memory --------------------------------------------------------------------------

    def _num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = sum(ModelShape.of(m.model).kv_bytes_per_block(cfg.block_size, cfg.dtype)
                        for m in self.models.values())
        if cfg.kv_cache_memory_bytes is not None:
            budget = cfg.kv_cache_memory_bytes
        elif str(cfg.device).startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(cfg.device))
            budget = int(free * cfg.kv_cache_memory_fraction)
        else:
            budget = cfg.cpu_kv_cache_bytes
        num_blocks = budget // per_block
        if num_blocks < 4:
            raise ValueError(f"a KV budget of {budget} bytes holds {num_blocks} blocks of "
                             f"{per_block} bytes: raise kv_cache_memory_bytes or num_kv_blocks")
        return num_blocks

    def _reservation(self, req: SearchRequest) -> dict:
        """Worst-case blocks per pool for one request (admission holds them until it ends)."""
        p = req.params
        need = {} if self.remote else {
            "large": self._tree_blocks(p, len(req.large_prompt_ids), p.max_new_tokens,
                                       p.chunk_len)}
        for i, sp in enumerate(req.small_prompts):
            if self.shared_vocab:
                need[i] = self._tree_blocks(p, len(sp.ids), p.max_new_tokens, p.chunk_len)
            else:
                # A re-tokenized response can be longer than the large model's tokens: reserve
                # SMALL_TOKENS_PER_LARGE of them (+8 for a rolled-back tail), and grow at run
                # time past that (_check_small_growth).
                need[i] = self._tree_blocks(p, len(sp.ids),
                                            SMALL_TOKENS_PER_LARGE * p.max_new_tokens + 8,
                                            SMALL_TOKENS_PER_LARGE * p.chunk_len + 8)
        return need

    def _tree_blocks(self, p: SearchParams, prompt_len: int, response_len: int,
                     chunk_len: int) -> int:
        """Blocks a search tree can hold at once. Only the current candidates hold tables, and
        they share their history: the prompt's full blocks once; at most W survivor lineages
        of up to response_len tokens (+1: its copy of the partial block it forked from); and
        each of the W*K candidates' own chunk (+1 likewise). Never more than W*K full copies."""
        bs = self.config.block_size
        copies = -(-prompt_len // bs) + 1 + p.w * p.k * (-(-response_len // bs) + 1)
        tree = (prompt_len // bs + p.w * (-(-response_len // bs) + 1)
                + p.w * p.k * (-(-chunk_len // bs) + 1))
        return min(copies, tree)

    def _check_small_growth(self, r: SearchRequest, ups: list):
        """A response can re-tokenize to more small tokens per large token than admission
        planned for (a word of one large token spelled out in bytes). Keep the request within
        the small models' context, and its blocks within its reservation, so that no pool runs
        out under the other requests: the reservation grows to what the request holds if the
        pool has unreserved room; if not, this request fails here, alone."""
        bs = self.config.block_size
        for si, sp in enumerate(r.small_prompts):
            mine = [(b, u) for s, b, u in ups if s == si]
            if not mine:
                continue
            limit = self.runners[self.stream_roles[si][0]].shape.max_positions
            longest = max(len(u.full_ids) for _, u in mine)
            if limit is not None and longest > limit:
                raise ValueError(
                    f"the response re-tokenizes to {longest} tokens of prompt + response for the "
                    f"small models, past their context of {limit}: lower max_new_tokens")
            # Blocks held after this update, at most: those held now (shared prefixes once),
            # each stream's new blocks, and one copy-on-write of the block it writes into.
            held = len({blk for b in r.beams for blk in b.small[si].table.blocks}) + sum(
                max(0, -(-len(u.full_ids) // bs) - len(b.small[si].table.blocks)) + 1
                for b, u in mine)
            if held <= r.reserved[si]:
                continue
            extra = held - r.reserved[si]
            if self.reserved[si] + extra > self.num_blocks:
                rate = max((len(u.full_ids) - len(sp.ids)) / max(
                    1, b.num_large_tokens if self.remote else len(b.token_ids)) for b, u in mine)
                raise ValueError(
                    f"the response re-tokenizes to {rate:.1f} small-model tokens per large-model "
                    f"token (KV was reserved for {SMALL_TOKENS_PER_LARGE}), and the small models' "
                    f"pool has no unreserved room for the {extra} more blocks it needs: lower "
                    "max_new_tokens or w*k, or give the engine more KV memory")
            r.reserved[si] += extra
            self.reserved[si] += extra

    def _fits(self, need: dict) -> bool:
        return all(self.reserved[k] + v <= self.num_blocks for k, v in need.items())

    # ---- requests --------------------------------------------------------------------------

    def make_request(self, prompt: str, params: SearchParams) -> SearchRequest:
        """Validate and tokenize one request (raises ValueError saying what to change)."""
        params = params.copy()
        params.validate()
        if isinstance(prompt, list):  # chat messages
            if not prompt or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                     and isinstance(m.get("role"), str) for m in prompt):
                raise ValueError("messages must be a non-empty list of {'role', 'content'} strings")
        elif not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt {prompt!r}: must be a non-empty string")
        if params.uses_small_models and not self.has_small:
            raise ValueError(f"method={params.method!r} needs tuned and untuned small models: "
                             "pass them to Engine(...), or use SearchParams.base()")
        if params.method == "eft" and not self.eft_ok:
            raise ValueError("method='eft' needs the large, tuned and untuned models to share one "
                             "vocabulary (and the small models one template); these do not: "
                             "use cbs or best_of_n")
        large_text = self.templates["large"].apply(self.large_tokenizer, prompt)
        if self.remote:
            large_ids = []  # the server tokenizes, and checks its own context
        else:
            large_ids = encode(self.large_tokenizer, large_text,
                               special=not self.templates["large"].chat)
            self._check_context("large", len(large_ids), params.max_new_tokens)
        small_prompts = []
        if params.uses_small_models:
            for roles in self.stream_roles:
                tok = self.models[roles[0]].tokenizer
                sp = SmallPrompt.make(tok, self.templates[roles[0]], prompt,
                                      self.config.small_special_tokens)
                if not sp.ids:
                    raise ValueError(f"the {roles[0]} model's templated prompt is empty: give the "
                                     "small template some text or turn small_special_tokens on")
                for r in roles:
                    self._check_context(r, len(sp.ids), params.max_new_tokens)
                small_prompts.append(sp)
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        req = SearchRequest(self.next_request_id, prompt, params, seed, large_ids, small_prompts,
                            large_prompt_text=large_text)
        req.reserved = self._reservation(req)
        capacity = self.num_blocks
        if any(v > capacity for v in req.reserved.values()):
            raise ValueError(
                f"request needs up to {max(req.reserved.values())} KV blocks in one pool, which "
                f"holds {capacity}: lower w*k ({params.w}*{params.k}) or max_new_tokens "
                f"({params.max_new_tokens}), or give the engine more KV memory")
        self.next_request_id += 1
        return req

    def _check_context(self, role: str, prompt_len: int, max_new: int):
        limit = self.runners[role].shape.max_positions
        if limit is not None and prompt_len + max_new > limit:
            raise ValueError(f"the {role} model's context is {limit} tokens; the prompt has "
                             f"{prompt_len} and max_new_tokens is {max_new}: shorten the prompt "
                             "or lower max_new_tokens")

    def add_request(self, prompt: str, params: SearchParams) -> SearchRequest:
        req = self.make_request(prompt, params)
        return self.enqueue(req)

    def enqueue(self, req: SearchRequest) -> SearchRequest:
        if self.config.max_waiting is not None and len(self.waiting) >= self.config.max_waiting:
            raise OverflowError(f"the queue holds {len(self.waiting)} requests: try again later")
        self.waiting.append(req)
        self.total["requests"] += 1
        return req

    def cancel(self, req: SearchRequest):
        """Drop a request wherever it is; its blocks return to the pools."""
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self._fail(req, "cancelled", count=False)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the loop --------------------------------------------------------------------------

    def step(self) -> list[SearchRequest]:
        """One engine step; returns the requests that ended (done or failed) in it."""
        self._admit()
        if self.remote:
            self._remote_chunks()
        else:
            self._decode()
        ready = [r for r in self.running if r.chunk_complete]
        if ready:
            self._score(ready)
            for r in ready:
                if r.status == "failed":
                    continue
                if r.select(self.kv):
                    r.finish(self._response_text)
                    self._release(r)
        for r in list(self.running):
            if r.status == "done":
                self.running.remove(r)
                self._ended.append(r)
        ended, self._ended = self._ended, []
        return ended

    def _admit(self):
        admitted, tokens = [], 0
        while self.waiting:
            req = self.waiting[0]
            if not self._fits(req.reserved):
                if not self.running and not admitted:  # cannot happen: make_request checked
                    raise RuntimeError("an admitted-size request does not fit an empty engine")
                break
            n = len(req.large_prompt_ids)
            if admitted and tokens + n > self.config.max_batch_tokens:
                break
            self.waiting.popleft()
            for k, v in req.reserved.items():
                self.reserved[k] += v
            admitted.append(req)
            tokens += n
        if not admitted:
            return
        for req in admitted:
            req.root = Beam(beam_id=req.new_beam_id(), token_ids=[],
                            large=None if self.remote else self.large_blocks.new_table())
            if req.params.uses_small_models:
                req.root.small = [SmallState(s.blocks.new_table(), list(sp.ids), len(sp.ids), [], {},
                                             sp.text, list(sp.starts))
                                  for s, sp in zip(self.streams, req.small_prompts)]
            self.running.append(req)
        if not self.remote:
            # The large model: one forward for all new prompts; keep each prompt's last logits.
            items = [(r.root.large, r.large_prompt_ids) for r in admitted]
            for table, ids in items:
                self.large_blocks.append(table, len(ids))
            runner = self.runners["large"]
            hidden, cu = runner.run(items)
            last = runner.compute_logits(hidden[(cu[1:] - 1).long()])
            for i, r in enumerate(admitted):
                r.root_logits = last[i]
                r.stats.tokens_forwarded["large"] = len(r.large_prompt_ids)
        for si, stream in enumerate(self.streams):
            using = [r for r in admitted if r.params.uses_small_models]
            if using:
                stream.prefill([r.root.small[si] for r in using])
                for r in using:
                    for role in self.stream_roles[si]:
                        r.stats.tokens_forwarded[role] = len(r.small_prompts[si].ids)
        for r in admitted:
            r.start(self.kv)

    def _decode(self):
        work = [(r, b) for r in self.running if r.status == "running" for b in r.generating]
        if not work:
            return
        fed = [(r, b) for r, b in work if b.token_ids]
        rows = []
        if fed:
            copies = []
            for _, b in fed:
                copies += self.large_blocks.append(b.large, 1)
            runner = self.runners["large"]
            runner.copy_blocks(copies)
            hidden, _ = runner.run([(b.large, b.token_ids[-1:]) for _, b in fed])
            logits = runner.compute_logits(hidden)
            for r, _ in fed:
                r.stats.tokens_forwarded["large"] += 1
            eft = [i for i, (r, _) in enumerate(fed) if r.params.method == "eft"]
            if eft:
                logits = self._eft_logits(logits, [fed[i] for i in eft], eft)
            rows.append(logits)
        first = [(r, b) for r, b in work if not b.token_ids]
        if first:
            # Beams with no token yet sample from their root's prompt logits: no forward.
            logits = torch.stack([r.root_logits for r, _ in first])
            eft = [i for i, (r, _) in enumerate(first) if r.params.method == "eft"]
            if eft:
                logits = self._eft_logits(logits, [first[i] for i in eft], eft)
            rows.append(logits)
        order = fed + first
        logits = torch.cat(rows) if len(rows) > 1 else rows[0]
        dev = logits.device
        params = [r.params for r, _ in order]
        tokens = sample(
            logits,
            torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
            torch.tensor([p.top_k for p in params], dtype=torch.int32, device=dev),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
            torch.tensor([r.beam_seed(b) for r, b in order], dtype=torch.int64, device=dev),
            torch.tensor([len(b.token_ids) for _, b in order], dtype=torch.int64, device=dev),
        ).tolist()
        for (r, b), tok in zip(order, tokens):
            r.record_token(b, tok, self.large_eos, self._response_text)
            if r.params.method == "eft":
                self._record_eft_term(b, tok)

    def _remote_chunks(self):
        """Ask the black-box large model for every pending chunk of this step at once.

        Children of one parent share its text, so each family is one request for n=K
        continuations (the backend tops up servers that return fewer choices).
        """
        families = {}
        for r in self.running:
            if r.status != "running":
                continue
            for b in r.generating:
                families.setdefault((r.request_id, b.parent_id), (r, []))[1].append(b)
        if not families:
            return
        jobs = []
        for r, beams in families.values():
            p, b = r.params, beams[0]
            jobs.append(CompletionJob(
                prompt=r.large_prompt_text + b.text, n=len(beams),
                max_tokens=min(p.chunk_len, p.max_new_tokens - b.num_large_tokens),
                temperature=p.temperature, top_p=p.top_p, stop=list(p.stop),
                seed=mix_seed(r.seed, b.beam_id) if p.seed is not None else None))
        answers = self.remote.complete_many(jobs)
        for (r, beams), answer in zip(families.values(), answers):
            if r.status != "running":
                continue
            if isinstance(answer, Exception):
                self._fail(r, f"{type(answer).__name__}: {answer}")
                continue
            for b, choice in zip(beams, answer):
                b.text += choice.text
                b.num_large_tokens += choice.num_tokens
                r.stats.tokens_sampled += choice.num_tokens
                b.chunk_tokens = r.params.chunk_len  # one call is one whole chunk
                if choice.finish_reason == "stop":
                    b.finished, b.finish_reason = True, "stop"
                elif b.num_large_tokens >= r.params.max_new_tokens:
                    b.finished, b.finish_reason = True, "length"

    def _eft_logits(self, logits, items, rows):
        """logits_large + beta * (logits_tuned - logits_untuned) for the EFT beams in `rows`.

        The small models step in lockstep with the large one (same vocabulary, so the same
        ids): each EFT beam feeds its last token to every small stream, or, for its first
        token, uses the prompt's final hidden state. Their log-probs are kept so the sampled
        token's reward term is recorded after sampling.
        """
        small_logits = {}
        for si, (stream, roles) in enumerate(zip(self.streams, self.stream_roles)):
            fed = [(r, b) for r, b in items if b.token_ids]
            if fed:
                copies = []
                for _, b in fed:
                    copies += stream.blocks.append(b.small[si].table, 1)
                for role in roles:
                    self.runners[role].copy_blocks(copies)
                    h, _ = self.runners[role].run([(b.small[si].table, b.token_ids[-1:])
                                                   for _, b in fed])
                    for j, (r, b) in enumerate(fed):
                        b.small[si].last_hidden[role] = h[j]
                        r.stats.tokens_forwarded[role] += 1
            for role in roles:
                h = torch.stack([b.small[si].last_hidden[role] for _, b in items])
                small_logits[role] = self.runners[role].compute_logits(h)
        vocab = len(self.large_tokenizer)
        lp_t = torch.log_softmax(small_logits["tuned"][:, :vocab], dim=-1)
        lp_u = torch.log_softmax(small_logits["untuned"][:, :vocab], dim=-1)
        logits = logits.clone()
        rows_t = torch.tensor(rows, device=logits.device)
        beta = torch.tensor([r.params.beta for r, _ in items], device=logits.device)[:, None]
        combined = logits[rows_t, :vocab] + beta * (lp_t - lp_u)
        logits[rows_t] = float("-inf")
        logits[rows_t, :vocab] = combined
        for j, (_, b) in enumerate(items):
            self._eft_logprobs[id(b)] = (lp_t[j], lp_u[j])
        return logits

    def _record_eft_term(self, b: Beam, token: int):
        lp_t, lp_u = self._eft_logprobs.pop(id(b))
        if b.finished and b.finish_reason == "stop" and token in self.large_eos:
            eos = self.streams[0].eos_id
            b.eos_term = float(lp_t[eos] - lp_u[eos])
        else:
            # EFT streams lag the sampled ids by one token in the cache, not in `ids`.
            b.small[0].ids.append(token)
            b.small[0].terms.append(float(lp_t[token] - lp_u[token]))
        b.reward = sum(b.small[0].terms) + b.eos_term

    def _score(self, ready: list[SearchRequest]):
        scoring = [r for r in ready if r.params.uses_small_models and r.params.method != "eft"]
        try:
            self._score_chunks(scoring)
        finally:
            for r in ready:
                # The moment of peak KV: every candidate holds its whole chunk in every model.
                if r.status != "failed":
                    self._record_peak(r)

    def _score_chunks(self, scoring: list[SearchRequest]):
        if not scoring:
            return
        per_stream = [[] for _ in self.streams]
        owners = []
        for r in scoring:
            try:
                ups = []
                for b in r.beams:
                    if b.chunk_tokens == 0:
                        continue  # a finished survivor carried from the last chunk
                    for si, sp in enumerate(r.small_prompts):
                        st = b.small[si]
                        if self.shared_vocab:
                            u = StreamUpdate(st, sp.ids + b.token_ids, len(sp.ids),
                                             b.finish_reason == "stop")
                        else:
                            # The bridge: text of the new tokens, a tail re-tokenized.
                            new, start = sp.extend(Tokenized(st.text, st.ids, st.starts),
                                                   self._response_text(b))
                            if start == 0:
                                raise ValueError("the small tokenization of prompt + response "
                                                 "changed the prompt's first token")
                            u = StreamUpdate(st, new.ids, start, b.finish_reason == "stop",
                                             text=new.text, starts=new.starts)
                        ups.append((si, b, u))
                if not self.shared_vocab:
                    self._check_small_growth(r, ups)
            except Exception as e:  # a bad request fails alone
                self._fail(r, f"{type(e).__name__}: {e}")
                continue
            for si, b, u in ups:
                per_stream[si].append(u)
                owners.append((r, b, si, u))
        for stream, ups in zip(self.streams, per_stream):
            if ups:
                stream.update(ups)
        touched = {}
        for r, b, si, u in owners:
            for role in self.stream_roles[si]:
                r.stats.tokens_forwarded[role] = r.stats.tokens_forwarded.get(role, 0) + u.forwarded
            r.stats.tokens_scored += u.scored
            touched.setdefault(id(b), (b, []))[1].append(u)
        for b, ups in touched.values():
            b.eos_term = sum(u.eos_term for u in ups)
            b.reward = sum(sum(s.terms) for s in b.small) + b.eos_term

    def _record_peak(self, r: SearchRequest):
        beams = r.beams
        peak = r.stats.peak_kv_blocks
        if not self.remote:
            large = {blk for b in beams for blk in b.large.blocks}
            peak["large"] = max(peak.get("large", 0), len(large))
        for si, roles in enumerate(self.stream_roles):
            if r.params.uses_small_models:
                n = len({blk for b in beams for blk in b.small[si].table.blocks})
                for role in roles:
                    peak[role] = max(peak.get(role, 0), n)

    def _release(self, r: SearchRequest):
        r.free_all(self.kv)
        for k, v in r.reserved.items():
            self.reserved[k] -= v
        r.reserved = {}
        for role, n in r.stats.tokens_forwarded.items():
            self.total["tokens"][role] += n

    def _fail(self, r: SearchRequest, message: str, count: bool = True):
        r.status, r.error = "failed", message
        self._release(r)
        if r in self.running:
            self.running.remove(r)
            self._ended.append(r)
        if count:
            self.total["failed"] += 1

    def _response_text(self, b: Beam) -> str:
        """The response as text (incrementally decoded), cut before a matched stop string."""
        if self.remote:
            return b.text  # the server already cut its stop strings
        text = self.detokenizer.update(b.detok, b.token_ids, flush=b.finished)
        return text if b.stop_text_len is None else text[:b.stop_text_len]

    # ---- the API ---------------------------------------------------------------------------

    def search(self, prompts, params: SearchParams | None = None) -> list[SearchResult]:
        """Run one search per prompt, all batched together; results in prompt order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt")
        params = params or SearchParams()
        requests = []
        for i, p in enumerate(prompts):
            try:
                requests.append(self.make_request(p, params))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for r in requests:
            self.enqueue(r)
        bar = tqdm(total=len(requests), desc=f"w2s {params.method}", unit="prompt",
                   disable=not self.config.progress or len(requests) < 2)
        pending = set(id(r) for r in requests)
        try:
            while pending:
                for r in self.step():
                    if id(r) in pending:
                        pending.discard(id(r))
                        bar.update(1)
        except BaseException:
            for r in requests:
                self.cancel(r)
            raise
        finally:
            bar.close()
        failed = [(i, r) for i, r in enumerate(requests) if r.status == "failed"]
        if failed:
            i, r = failed[0]
            raise SearchError(f"prompt {i} failed: {r.error}")
        return [r.result for r in requests]

    def score(self, prompts, responses, finished=True) -> list[float]:
        """The implicit reward of given responses (texts, or the small models' token ids)."""
        if not self.has_small:
            raise ValueError("score() needs the tuned and untuned small models")
        if isinstance(prompts, str):
            prompts, responses = [prompts], [responses]
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        flags = finished if isinstance(finished, (list, tuple)) else [finished] * len(prompts)
        rewards = [0.0] * len(prompts)
        for stream, roles in zip(self.streams, self.stream_roles):
            tok = self.models[roles[0]].tokenizer
            updates = []
            for prompt, response, fin in zip(prompts, responses, flags):
                sp = SmallPrompt.make(tok, self.templates[roles[0]], prompt,
                                      self.config.small_special_tokens)
                if isinstance(response, str):
                    full, start = sp.full_ids(response)
                else:
                    full, start = sp.ids + list(response), len(sp.ids)
                st = SmallState(stream.blocks.new_table(), list(sp.ids), len(sp.ids), [], {})
                updates.append(StreamUpdate(st, full, start, bool(fin)))
            # Batched like the search's own scoring, in groups that fit half the free pool.
            budget = stream.blocks.num_free * stream.blocks.block_size // 2
            i = 0
            while i < len(updates):
                group, tokens = [], 0
                while i < len(updates) and (not group or
                                            tokens + len(updates[i].full_ids) + 1 <= budget):
                    group.append(updates[i])
                    tokens += len(updates[i].full_ids) + 1
                    i += 1
                try:
                    stream.prefill([u.state for u in group])
                    stream.update(group)
                finally:
                    for u in group:
                        stream.blocks.free(u.state.table)
            for j, u in enumerate(updates):
                rewards[j] += sum(u.state.terms) + u.eos_term
        return rewards

    def check_all_free(self):
        """The invariant after every request: every block of every pool is free."""
        if self.large_blocks is not None:
            self.large_blocks.check_all_free()
        for s in self.streams:
            s.blocks.check_all_free()
