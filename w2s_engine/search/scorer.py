"""Scorer: the reward of a search, a weighted sum of its scorers, each incremental on paged KV.

- The implicit pair (the paper's): r(y) = sum_t log pi_tuned(y_t | x_t, y_<t) -
  log pi_untuned(y_t | x_u, y_<t), on one stream when both small models read the same tokens
  (one tokenizer, one template: the usual case), else one each (search/small_stream.py).
- A reward model: its classification head at the last token of its rendering of prompt +
  response, the template's suffix appended for each read and rolled back
  (search/head_stream.py).
- A process reward model: a score at the tag after each step (search/steps.py), aggregated;
  it reads the response as text, tags inserted, whatever its tokenizer.
It owns the scoring side of every request: each stream's templated prompt, and chunk scoring.
After each chunk, plan() turns every candidate's new response into a StreamUpdate per stream,
in that stream's tokens: the sampled ids as they are when its tokenizer is the large model's,
else the response text re-tokenized over a tail window (the bridge). It raises for a request
that cannot be scored (its re-tokenized response outgrows a model's context or its KV
reservation), which then fails alone; run() forwards the updates of all requests together,
one forward per model, and sets each candidate's reward.
"""

from dataclasses import dataclass, field

from torch.profiler import record_function   # names the scoring's phases in a profile

from w2s_engine.cache.block_manager import BlockManager, OutOfBlocks
from w2s_engine.cache.kv_budget import SMALL_TOKENS_PER_LARGE, KVBudget
from w2s_engine.models.runner import BatchFailed
from w2s_engine.params import check_text, is_int
from w2s_engine.search.head_stream import HeadStream, pooled_position
from w2s_engine.search.prompts import ResponseTemplate, SmallPrompt, Template, check_context
from w2s_engine.search.request import SearchRequest
from w2s_engine.search.sequence import Beam, SmallState
from w2s_engine.search.small_stream import SmallStream, StreamUpdate, prompt_in
from w2s_engine.search.steps import aggregate, tag_steps
from w2s_engine.search.reward_models import RewardModelParts, Steps
from w2s_engine.search.tokens import Tokenized, common_prefix_after


@dataclass
class Part:
    """One term of the weighted sum: its kind, weight and streams (indices into streams)."""

    kind: str                   # "implicit", "reward_model" or "process_reward_model"
    weight: float
    streams: list[int]
    steps: Steps | None = None


@dataclass
class ScoringLaunch:
    """Planned updates whose forwards and reward kernels are queued on the device, their
    rewards not read yet: Scorer.launch, then Scorer.finish (or roll_back)."""
    plans: list                 # (request, [(stream index, beam, update)]) per request
    launched: list              # (stream, Launched) per stream with updates

    @property
    def requests(self) -> list[SearchRequest]:
        return [r for r, _ in self.plans]

    def roll_back(self):
        """Each launched state back to what it kept (a table freed since holds nothing)."""
        for stream, pending in self.launched:
            pending.roll_back(stream.blocks)


@dataclass
class ScoreWork:
    """What score() calls have read, for their usage and the engine's stats: the pairs'
    tokens (prompt, response and template suffix in each scorer stream's own tokens, summed
    over the streams), and per model, those it forwarded and those read from the prefix
    cache instead."""
    tokens: int = 0
    forwarded: dict[str, int] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)

    def add(self, roles: list[str], tokens: int, cached: int):
        self.tokens += tokens
        for role in roles:
            self.forwarded[role] = self.forwarded.get(role, 0) + tokens - cached
            self.cached[role] = self.cached.get(role, 0) + cached


class NoRoomYet(ValueError):
    """A request's scoring needs more KV than its pools have unreserved now (its response
    re-tokenized to more small tokens than admission reserved): the room another request's
    end frees may let it go on, and the engine keeps it waiting while one can."""


class Scorer:

    def __init__(self, pair: dict, templates: dict[str, Template], budget: KVBudget,
                 large_vocab: dict | None, special_tokens: bool, max_batch_tokens: int,
                 implicit_weight: float = 1.0,
                 reward_models: list[RewardModelParts] | None = None,
                 prefix_caching: bool = False):
        """pair: role -> (ModelRunner, tokenizer) for "tuned" and "untuned", or empty (no
        implicit reward). large_vocab: the large tokenizer's vocabulary, None for a black-box
        large model. reward_models: explicit reward models, after the pair in the sum.
        prefix_caching: the streams' pools keep prompts' blocks for later prompts."""
        assert set(pair) in (set(), {"tuned", "untuned"})
        self.budget = budget
        self.scored = ScoreWork()     # score()'s reads, summed over its calls
        self.streams: list[SmallStream | HeadStream] = []
        self.tokenizers = []
        self.templates: list[Template | ResponseTemplate] = []
        # Whether each stream's prompt is tokenized with its special tokens: the small pair's
        # as the engine says (small_special_tokens), a reward model's as its spec says.
        self.specials: list[bool] = []
        self.parts: list[Part] = []

        def add(stream, tokenizer, template, special) -> int:
            self.streams.append(stream)
            self.tokenizers.append(tokenizer)
            self.templates.append(template)
            self.specials.append(special)
            return len(self.streams) - 1

        def pool():
            return BlockManager(budget.num_blocks, budget.block_size, prefix_caching)

        if pair:
            (_, tok_t), (_, tok_u) = pair["tuned"], pair["untuned"]
            same = tok_t.get_vocab() == tok_u.get_vocab() and templates["tuned"] == templates["untuned"]
            indices = []
            for roles in ([("tuned", "untuned")] if same else [("tuned",), ("untuned",)]):
                tok = pair[roles[0]][1]
                indices.append(add(SmallStream({r: pair[r][0] for r in roles}, pool(),
                                               tok.eos_token_id, max_batch_tokens),
                                   tok, templates[roles[0]], special_tokens))
            self.parts.append(Part("implicit", implicit_weight, indices))
        self.pads: dict[int, int | None] = {}   # sequence reward models' streams: pad token
        for rm in reward_models or []:
            i = add(HeadStream(rm.role, rm.runner, pool(), rm.read, max_batch_tokens),
                    rm.tokenizer, rm.template, rm.special_tokens)
            if rm.steps is None:
                self.pads[i] = rm.pad_id
            kind = "reward_model" if rm.steps is None else "process_reward_model"
            self.parts.append(Part(kind, rm.weight, [i], rm.steps))
        # A stream whose tokenizer is the large model's scores the sampled ids as they are
        # (a PRM reads tags inserted in the text: never).
        steps = {i: p.steps for p in self.parts for i in p.streams if p.steps is not None}
        self.steps: list[Steps | None] = [steps.get(i) for i in range(len(self.streams))]
        # ... nor does one whose chat template strips the response's edges (Llama 3's), which
        # the stream does to the response's text (SmallPrompt.response).
        self.strips = [(template.content_rule(t) or "") if isinstance(template, ResponseTemplate)
                       else "" for t, template in zip(self.tokenizers, self.templates)]
        self.shared = [t.get_vocab() == large_vocab and self.steps[i] is None
                       and not self.strips[i] for i, t in enumerate(self.tokenizers)]
        # The stream whose response tokens a hypothesis reports: the first that reads the
        # response as it is (a PRM's has step tags in it); None: none does.
        self.reported_stream = next((i for i, st in enumerate(self.steps) if st is None), None)
        # score() takes token ids where every stream reads them as the same tokens.
        vocabs = [t.get_vocab() for t in self.tokenizers]
        self.one_vocabulary = all(v == vocabs[0] for v in vocabs[1:])

    @property
    def stream_roles(self) -> list[tuple[str, ...]]:
        return [s.roles for s in self.streams]

    @property
    def blocks(self) -> list[BlockManager]:
        return [s.blocks for s in self.streams]

    @property
    def shared_vocab(self) -> bool:
        """Whether the implicit pair reads the large model's sampled ids as they are."""
        implicit = self._implicit()
        return implicit is not None and all(self.shared[i] for i in implicit.streams)

    @property
    def eft_stream(self) -> SmallStream | None:
        """The stream EFT steers with: the implicit pair alone, on one stream, in the large
        model's vocabulary (token-level mixing needs one vocabulary for all three)."""
        implicit = self._implicit()
        if implicit is None or len(self.parts) != 1 or len(implicit.streams) != 1 \
                or not self.shared[implicit.streams[0]]:
            return None
        return self.streams[implicit.streams[0]]

    def _implicit(self) -> Part | None:
        return next((p for p in self.parts if p.kind == "implicit"), None)

    # ---- requests ------------------------------------------------------------------------

    def prompts(self, prompt, max_new_tokens: int, chat: bool | None = None,
                continue_final: bool = False,
                template_kwargs: dict | None = None) -> list[SmallPrompt]:
        """Each stream's templated, tokenized prompt (raises ValueError saying what to change).
        chat: the small pair's chat rendering switched for this request (Template.rendered_as);
        a reward model renders as it was configured. continue_final: the response continues
        the last message; template_kwargs: the chat templates' variables (Template.apply)."""
        out = []
        for stream, tok, template, strip, special in zip(
                self.streams, self.tokenizers, self.templates, self.strips, self.specials):
            role = stream.roles[0]
            if isinstance(template, Template):
                template = template.rendered_as(chat)
            sp = SmallPrompt.make(tok, template, prompt, special, continue_final,
                                  template_kwargs, strip)
            if not sp.ids:
                raise ValueError(f"the {role} model's templated prompt is empty: give the "
                                 "template some text or turn small_special_tokens on")
            for r, runner in stream.runners.items():
                check_context(r, runner.shape.max_positions, len(sp.ids) + len(sp.suffix_ids),
                              max_new_tokens)
            out.append(sp)
        return out

    def context_room(self, prompts: list[SmallPrompt]) -> int | None:
        """New tokens these prompts (prompts()'s) leave in the smallest of the streams' model
        contexts, counted as prompts() checks them (None: no model says)."""
        rooms = [runner.shape.max_positions - len(sp.ids) - len(sp.suffix_ids)
                 for stream, sp in zip(self.streams, prompts)
                 for runner in stream.runners.values() if runner.shape.max_positions]
        return min(rooms) if rooms else None

    def prefill(self, requests: list[SearchRequest], max_tokens: int) -> list[SearchRequest]:
        """Forward the next chunk of these requests' prompts in each small stream (in order,
        max_tokens in all per stream: one forward per model), giving a new root its states
        first; returns the requests whose prompts are all in, in every stream."""
        for r in requests:
            if not r.root.small:
                r.root.small = [SmallState(s.blocks.new_table(), list(sp.ids), len(sp.ids), [],
                                           {}, sp.text, list(sp.starts))
                                for s, sp in zip(self.streams, r.small_prompts)]
                for s, st in zip(self.streams, r.root.small):   # what the prefix cache holds
                    cached = s.blocks.take_cached_prefix(st.table, st.ids)
                    for role in s.roles:
                        r.stats.cached_prompt_tokens[role] = cached
        for si, stream in enumerate(self.streams):
            states = [r.root.small[si] for r in requests]
            before = [st.table.num_tokens for st in states]
            stream.prefill_chunk(states, max_tokens)
            for r, st, n in zip(requests, states, before):   # the work as it is done
                for role in stream.roles:
                    r.stats.tokens_forwarded[role] = (r.stats.tokens_forwarded.get(role, 0)
                                                      + st.table.num_tokens - n)
                if n < len(st.ids) == st.table.num_tokens:   # all in now: cached for others
                    stream.blocks.cache_prompt(st.table, st.ids)
        return [r for r in requests if all(prompt_in(st) for st in r.root.small)]

    # ---- chunk scoring ---------------------------------------------------------------------

    def plan(self, r: SearchRequest, large) -> list[tuple[int, Beam, StreamUpdate]]:
        """The updates that score request r's new chunks: (stream, beam, update) each.
        `large` gives each beam's response text and large-token count. Raises for a request
        that cannot be scored; nothing is changed then."""
        beams = [b for b in r.beams if b.chunk_tokens]   # not a carried finished survivor
        texts = None
        ups = []
        for si, sp in enumerate(r.small_prompts):
            if self.shared[si]:
                mine = [self._shared_update(si, sp, b, large) for b in beams]
            else:
                if texts is None:
                    texts = [large.response_text(b) for b in beams]
                mine = self._bridge(si, sp, [b.small[si] for b in beams], texts)
                for b, u in zip(beams, mine):
                    u.finished = b.finish_reason == "stop"
                    # another vocabulary's EOS was sampled: the small model's chat template's
                    # end of turn is scored (SmallPrompt.end_id; None: its eos_token)
                    u.eos_id = sp.end_id
            for b, u in zip(beams, mine):
                if si in self.pads:     # a sequence reward model: one read, where it pools
                    u.reads = [pooled_position(u.full_ids, self.pads[si])]
                ups.append((si, b, u))
        self._check_growth(r, ups, large)
        return ups

    def plan_cut_samples(self, r: SearchRequest, large) -> list[tuple[int, Beam, StreamUpdate]]:
        """EFT scored each token as it sampled it; a sample a stop string cut is scored again
        here, on the tokens of the text returned (_shared_update's rule), so that its reward
        is score()'s for it. The token scored but not forwarded (and one fed in flight past
        it) is dropped first: the update re-forwards from where the tokenizations part."""
        si = 0   # EFT runs on one stream (eft_stream)
        ups = []
        for b in r.beams:
            if b.stop_text_len is None:
                continue
            st = b.small[si]
            st.keep_first(self.streams[si].blocks, min(st.table.num_tokens, len(st.ids)))
            st.last_hidden = {}
            ups.append((si, b, self._shared_update(si, r.small_prompts[si], b, large)))
        self._check_growth(r, ups, large)
        return ups

    def _shared_update(self, si: int, sp: SmallPrompt, b: Beam, large) -> StreamUpdate:
        """A beam's update where the stream reads the large model's tokens: the sampled ids;
        for a response a stop string cut, the tokens of the text returned (what score()
        scores for it), not the sampled ones past the cut."""
        if b.stop_text_len is None or self.steps[si] is not None:
            # A response an EOS ended scores the EOS id sampled (a chat model's end of turn
            # may not be its tokenizer's eos_token; EFT scored it so too). One copy of the
            # prompt's hundreds of ids per beam, not two (the suffix is extended in place).
            full = sp.ids + b.token_ids
            if sp.suffix_ids:
                full += sp.suffix_ids
            return StreamUpdate(b.small[si], full, len(sp.ids), b.finish_reason == "stop",
                                eos_id=b.eos_token)
        # scored as score(text, finished=True) and a search across vocabularies score it: the
        # text, then the template's end of turn (SmallPrompt.end_id; None: the eos_token)
        full, start = sp.full_ids(large.response_text(b))
        return StreamUpdate(b.small[si], full + sp.suffix_ids, start, True, eos_id=sp.end_id)

    def _bridge(self, si: int, sp: SmallPrompt, states: list[SmallState],
                texts: list[str]) -> list[StreamUpdate]:
        """Each state's new content from its response text: a tail re-tokenized (the bridge;
        all states' windows in one call into the tokenizer); a reward model's suffix is
        tokenized on its own and follows; a PRM's text has its step tags, and reads at each."""
        steps = self.steps[si]
        rendered, suffixes, tags = [], [], []
        for st, text in zip(states, texts):
            suffix = sp.suffix_ids
            if steps is not None:
                tagged, unfinished, offsets = tag_steps(text, steps.tag, steps.separator,
                                                        st.marks)
                tags.append(offsets)
                if steps.separator is None and len(text) > (st.marks[-1] if st.marks else 0):
                    st.marks = st.marks + [len(text)]   # this chunk ends a step for the next
                if unfinished:
                    suffix = [steps.tag_id] + suffix
                text = tagged
            rendered.append(text)
            suffixes.append(suffix)
        # A state's ids are its text's tokens, then a reward model's suffix, if any (copied
        # only then: the bridge reads the old tokens and builds new lists).
        olds = [Tokenized(st.text, st.ids if len(st.ids) == len(st.starts) else
                          st.ids[:len(st.starts)], st.starts) for st in states]
        ups = []
        for j, (st, suffix, (new, start, kept)) in enumerate(zip(states, suffixes,
                                                              sp.extend_many(olds, rendered))):
            u = StreamUpdate(st, new.ids + suffix if suffix else new.ids, start, False,
                             text=new.text, starts=new.starts, same=kept)
            if steps is not None:
                # Read at the tags inserted after steps (the response is the text's tail), not
                # at the same text written in the response.
                base = len(new.text) - len(rendered[j])
                inserted = {base + o for o in tags[j]}
                u.reads = [i for i in range(start, len(new.ids))
                           if new.ids[i] == steps.tag_id and new.starts[i] in inserted]
                if len(suffix) > len(sp.suffix_ids):
                    u.reads.append(len(new.ids))
            ups.append(u)
        return ups

    def _check_growth(self, r: SearchRequest, ups: list, large):
        """A response can re-tokenize to more small tokens per large token than admission
        planned for (a word of one large token spelled out in bytes). Keep the request within
        each model's context, and its blocks within its reservation, so that no pool runs
        out under the other requests: the reservation grows to what the request holds if the
        pool has unreserved room; if not, this request fails here, alone."""
        for si, (sp, stream) in enumerate(zip(r.small_prompts, self.streams)):
            mine = [(b, u) for s, b, u in ups if s == si]
            if not mine or self.shared[si] and all(
                    len(u.full_ids) <= len(sp.ids) + len(b.token_ids) + len(sp.suffix_ids)
                    for b, u in mine):
                continue    # the sampled ids: no more tokens than admission planned for
            limit = stream.runners[stream.roles[0]].shape.max_positions
            longest = max(len(u.full_ids) for _, u in mine)
            if limit is not None and longest > limit:
                raise ValueError(
                    f"the response re-tokenizes to {longest} tokens of prompt + response for the "
                    f"{stream.roles[0]} model, past its context of {limit}: lower max_new_tokens")
            # Blocks held during this update, at most: those held now (shared prefixes once;
            # a block one stream cuts may stay held by a sibling that keeps it), and each
            # stream's new blocks from where SmallStream._make_room cuts its table (one kept
            # token before the first changed one) to its new length, and one copy-on-write.
            def new_blocks(b, u):
                st = b.small[si]
                kept = max(0, min(common_prefix_after(st.ids, u.full_ids, u.same),
                                  len(st.ids)) - 1)
                return max(0, stream.blocks.blocks_for(len(u.full_ids))
                           - stream.blocks.blocks_for(kept)) + 1
            held = len({blk for b in r.beams for blk in b.small[si].table.blocks}) + sum(
                new_blocks(b, u) for b, u in mine)
            missing = self.budget.grow(r.reserved, si, held)
            if missing:
                # Past the whole pool, no other request's end can make the room: the request
                # fails now (it would alone), not after holding its blocks while others wait.
                never = held > self.budget.num_blocks
                wait = ValueError if never else NoRoomYet
                room = (f"the {stream.roles[0]} model's pool of {self.budget.num_blocks} blocks "
                        f"cannot hold the {held} it needs: lower max_new_tokens or w*k, or give "
                        "the engine more KV memory" if never else
                        f"the {stream.roles[0]} model's pool has no unreserved room for the "
                        f"{missing} more blocks it needs: retry when the engine is less busy, "
                        "lower max_new_tokens or w*k, or give the engine more KV memory")
                if self.shared[si]:    # reserved as sampled; a stop string's cut re-tokenized
                    b, u = max(mine, key=lambda m: len(m[1].full_ids) - len(m[0].token_ids))
                    raise wait(
                        f"the text a stop string left re-tokenizes to "
                        f"{len(u.full_ids) - len(sp.ids) - len(sp.suffix_ids)} tokens where "
                        f"{len(b.token_ids)} were sampled (KV was reserved for those), and {room}")
                rate = max((len(u.full_ids) - len(sp.ids)) / max(1, large.num_tokens(b))
                           for b, u in mine)
                # A black box's tokens are its server's count, at most max_tokens a call: a
                # server that ignores max_tokens sends more text than was counted.
                server = ("; if the large model's server ignores max_tokens, its chunks are "
                          "longer than counted: check that it honours max_tokens"
                          if large.tokenizer is None else "")
                raise wait(
                    f"the response re-tokenizes to {rate:.1f} small-model tokens per large-model "
                    f"token (KV was reserved for {SMALL_TOKENS_PER_LARGE}), and {room}{server}")

    def run(self, plans: list[tuple[SearchRequest, list]]):
        """Forward every planned update (all requests, one batch per stream); set rewards."""
        self.finish(self.launch(plans))

    def launch(self, plans: list[tuple[SearchRequest, list]]) -> ScoringLaunch:
        """run()'s first half: queue every stream's forwards and reward kernels, reading
        nothing, so that the host queues the next stream's while the device runs the last's
        (and, with async scheduling, the engine reads them a step later). If one fails, the
        others' launched updates roll back too (a retry runs each request alone from where
        it was)."""
        per_stream = [[] for _ in self.streams]
        for _, ups in plans:
            for si, _, u in ups:
                per_stream[si].append(u)
        launched = []
        try:
            with record_function("w2s.score.launch"):
                for stream, ups in zip(self.streams, per_stream):
                    if ups:
                        launched.append((stream, stream.launch(ups)))
        except BaseException:
            ScoringLaunch(plans, launched).roll_back()
            raise
        return ScoringLaunch(plans, launched)

    def finish(self, scoring: ScoringLaunch):
        """run()'s second half: read each stream's rewards (the waits) and set the beams'
        rewards. If a read fails, every update not finished rolls back."""
        launched = list(scoring.launched)
        try:
            with record_function("w2s.score.read"):
                while launched:
                    stream, pending = launched[0]
                    stream.finish(pending)
                    launched.pop(0)
        except BaseException:
            ScoringLaunch(scoring.plans, launched).roll_back()
            raise
        touched = {}
        for r, ups in scoring.plans:
            # A request's counts summed here and added to its stats once per stream, not per
            # update (its hundreds of updates each did a dict read and write per model).
            forwarded = [0] * len(self.streams)
            scored = 0
            for si, b, u in ups:
                forwarded[si] += u.forwarded
                scored += u.scored
                touched.setdefault(id(b), (b, []))[1].append(u)
            for si in sorted({si for si, _, _ in ups}):
                for role in self.streams[si].roles:
                    r.stats.tokens_forwarded[role] = (r.stats.tokens_forwarded.get(role, 0)
                                                      + forwarded[si])
            r.stats.tokens_scored += scored
        for b, ups in touched.values():
            b.eos_term = sum(u.eos_term for u in ups)
            b.reward = self.reward(b)

    def reward(self, b: Beam) -> float:
        """The weighted sum of the beam's scorers, from its states."""
        total = 0.0
        for part in self.parts:
            if part.kind == "implicit":
                value = sum(sum(b.small[i].terms) for i in part.streams) + b.eos_term
            else:
                value = self._head_value(part, b.small[part.streams[0]])
            total += part.weight * value
        return total

    @staticmethod
    def _head_value(part: Part, st: SmallState) -> float:
        values = list(st.reads.values())
        if part.kind == "reward_model":
            return values[-1]
        return aggregate(values, part.steps.aggregate)

    # ---- given responses -------------------------------------------------------------------

    def score(self, prompts: list, responses: list, finished: list[bool],
              continue_final: bool = False,
              template_kwargs: dict | None = None) -> list[float]:
        """The reward of given responses: texts, or (one vocabulary for all scorers) their
        token ids. continue_final, template_kwargs: as prompts() takes them."""
        self._check_responses(responses, finished)
        values = []      # per stream, per response
        for stream, tok, template in zip(self.streams, self.tokenizers, self.templates):
            updates = []
            si = len(values)
            for prompt, response, fin in zip(prompts, responses, finished):
                sp = SmallPrompt.make(tok, template, prompt, self.specials[si], continue_final,
                                      template_kwargs, self.strips[si])
                st = SmallState(stream.blocks.new_table(), list(sp.ids), len(sp.ids), [], {},
                                sp.text, list(sp.starts))
                if isinstance(response, str) and self.steps[si] is not None:
                    u, = self._bridge(si, sp, [st], [response])
                else:
                    if isinstance(response, str):
                        full, start = sp.full_ids(response)
                    elif sp.strip:
                        raise ValueError(
                            f"responses[{len(updates)}]: token ids, but the reward model's chat "
                            "template strips the response's text at its edges (as the scorer "
                            "then does): pass the response as text")
                    else:
                        full, start = sp.ids + list(response), len(sp.ids)
                    u = StreamUpdate(st, full + sp.suffix_ids, start, bool(fin),
                                     eos_id=sp.end_id)
                if si in self.pads:
                    u.reads = [pooled_position(u.full_ids, self.pads[si])]
                tokens = len(u.full_ids)     # (EOS is a target at the last position)
                for role, runner in stream.runners.items():
                    limit = runner.shape.max_positions
                    if limit is not None and tokens > limit:
                        raise ValueError(
                            f"responses[{len(updates)}]: the prompt and response are {tokens} "
                            f"tokens for the {role} model, whose context is {limit}: shorten "
                            "them")
                updates.append(u)
            # Tables for a group at once: groups that fit half the free pool (the other half
            # is the search's, which may run beside).
            room = stream.blocks.num_free * stream.blocks.block_size // 2
            i = 0
            while i < len(updates):
                group, tokens = [], 0
                while i < len(updates) and (not group or
                                            tokens + len(updates[i].full_ids) + 1 <= room):
                    group.append(updates[i])
                    tokens += len(updates[i].full_ids) + 1
                    i += 1
                try:
                    cached = stream.prefill([u.state for u in group])
                    stream.update(group)
                    self.scored.add(stream.roles, sum(len(u.full_ids) for u in group),
                                    cached)
                except (BatchFailed, OutOfBlocks) as e:
                    # (the prefill's appends raise OutOfBlocks as it is: a long prompt)
                    short = e if isinstance(e, OutOfBlocks) else e.__cause__
                    if not isinstance(short, OutOfBlocks):
                        raise
                    # (one response alone past the free pool: the searches' hold the rest)
                    which = (f"{i - 1}" if len(group) == 1 else f"{i - len(group)}:{i}")
                    capacity = stream.blocks.num_blocks * stream.blocks.block_size
                    # NoRoomYet where the searches' blocks are what it lacks: it fits once
                    # they end (AsyncEngine.score waits for that), else it never will here.
                    wait = ValueError if tokens > capacity else NoRoomYet
                    raise wait(
                        f"responses[{which}]: {tokens} tokens for the scorer, "
                        f"and its KV pool has room for {room} beside the searches now "
                        f"({short}) and holds {capacity} in all: score fewer or shorter "
                        "responses at once, or give the engine more KV memory") from None
                finally:
                    for u in group:
                        stream.blocks.free(u.state.table)
            values.append(updates)
        rewards = []
        for j in range(len(prompts)):
            total = 0.0
            for part in self.parts:
                if part.kind == "implicit":
                    value = sum(sum(values[i][j].state.terms) + values[i][j].eos_term
                                for i in part.streams)
                else:
                    value = self._head_value(part, values[part.streams[0]][j].state)
                total += part.weight * value
            rewards.append(total)
        return rewards

    def _check_responses(self, responses: list, finished: list):
        """Texts, or token ids within every small model's vocabulary (TypeError, ValueError)."""
        vocab = min(r.shape.vocab_size for s in self.streams for r in s.runners.values())
        for i, (response, fin) in enumerate(zip(responses, finished)):
            if not isinstance(fin, bool):
                raise TypeError(f"finished[{i}]: expected True or False, got {type(fin).__name__}")
            if isinstance(response, str):
                check_text(f"responses[{i}]", response)
                continue
            if not isinstance(response, (list, tuple)) or not all(map(is_int, response)):
                raise TypeError(f"responses[{i}]: expected a text or a list of int token ids, "
                                f"got {type(response).__name__}")
            if any(steps is not None for steps in self.steps):
                raise ValueError(f"responses[{i}]: a process reward model reads the response's "
                                 "text (its step tags go into the text): pass the response as "
                                 "a text, not token ids")
            if not self.one_vocabulary:
                raise ValueError(f"responses[{i}]: the scorers have different tokenizers, so "
                                 "token ids would be other tokens for each: pass the response "
                                 "as a text")
            bad = next((t for t in response if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"responses[{i}]: token id {bad} is outside the small models' "
                                 f"vocabulary [0, {vocab})")
