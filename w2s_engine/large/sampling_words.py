"""A decode step's sampling parameters and logit adjustments as int32 words, row by row.

The host packs them with numpy (this runs every step, for every beam, while the device
waits), they ride in the step's one upload, and the device unpacks them into the sampling
kernel's and adjust_logits' arguments. Rows with a token still in flight (async scheduling)
come first and count it (`ahead`).
"""

import numpy as np
import torch

from w2s_engine.search.request import mix_seeds


SAMPLING_WORDS = 7


def sampling_words(order, ahead: int = 0) -> np.ndarray:
    """Each row's sampling parameters as int32 words [SAMPLING_WORDS, B]: temperature and
    top_p (fp32 bits), top_k, the seed's low and high halves, the position (tokens so far;
    the first `ahead` rows have one more, in flight) and min_p (fp32 bits). A step's rows
    come in runs of one request: the request's values
    are read once per run and repeated, and the beams' seeds are mixed in one numpy pass
    (this runs every step, for every beam, while the GPU waits)."""
    starts = [i for i in range(len(order)) if i == 0 or order[i][0] is not order[i - 1][0]]
    runs = np.diff(np.array(starts + [len(order)]))
    params = [order[i][0].params for i in starts]

    def per_row(values, dtype):
        return np.repeat(np.array(values, dtype=dtype), runs)

    seeds = mix_seeds(per_row([order[i][0].seed for i in starts], np.uint64),
                      np.array([b.beam_id for _, b in order], dtype=np.uint64))
    return np.stack([
        per_row([p.temperature for p in params], np.float32).view(np.int32),
        per_row([p.top_p for p in params], np.float32).view(np.int32),
        per_row([p.top_k for p in params], np.int32),
        (seeds & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32),
        (seeds >> np.uint64(32)).astype(np.int32),
        np.array([len(b.token_ids) + (i < ahead) for i, (_, b) in enumerate(order)],
                 dtype=np.int32),
        per_row([p.min_p for p in params], np.float32).view(np.int32)])


def before_min_tokens(p, b, in_flight: bool = False) -> bool:
    """The beam may not end yet: its EOS and stop token ids are banned (min_tokens).
    in_flight: it has one token more than it has recorded."""
    return len(b.token_ids) + in_flight < p.min_tokens and p.stops_on_a_token


def adjustment_words(order, eos_ids, in_flight: list[int] = ()) \
        -> tuple[np.ndarray, tuple[int, int, int, int, int, int]] | None:
    """The R rows whose logits a penalty, a bias or a ban adjusts, and what they need, as int32
    words for one upload: the rows [R], the N token occurrences [3, N] (row among the R,
    token, 1 if in the response), the M biased tokens [2, M] (row among the R, token), then
    fp32 bits: the presence, frequency and repetition factors [3, R] and the biases [M]
    (logit_bias; -inf on EOS before min_tokens, and on a bad word's last token where the
    response ends with the rest of it), then the E response tokens still in flight [2, E] (row
    among the R, the row of the step that sampled it), the A allowed tokens [2, A] (row among
    the R, token: allowed_token_ids), and the C bans that wait on a token in flight [4, C] (row
    among the R, the bad word's last token, the token the one in flight must be to ban it,
    the row of the step that sampled it); with (R, N, M, E, A, C). None if no row adjusts.
    Each step sends each such beam's whole history (the prompt's only for repetition): a
    second upload in the steps that have adjustments.
    in_flight: for the first rows (async scheduling), the row of the step in flight that
    holds their last token, which the host has not read yet (adjustment_tensors gathers it)."""
    # Most steps have no such row: answer that per request, not per beam.
    requests = {id(r): r.params for r, _ in order}.values()
    if not any(p.adjusts_logits or (p.min_tokens and p.stops_on_a_token) for p in requests):
        return None
    ahead = len(in_flight)
    picked = [(i, r, b) for i, (r, b) in enumerate(order)
              if r.params.adjusts_logits or before_min_tokens(r.params, b, i < ahead)]
    if not picked:
        return None
    occurrences, biased, biases, pending, allowed, waiting = [], [], [], [], [], []
    for j, (i, r, b) in enumerate(picked):
        p = r.params
        bias = dict(p.logit_bias)
        if before_min_tokens(p, b, i < ahead):
            ended_by = p.stop_token_ids if p.ignore_eos else [*eos_ids, *p.stop_token_ids]
            bias.update((e, float("-inf")) for e in ended_by)
        for word in r.bad_word_ids:
            ban = bad_word_ban(word, b.token_ids, in_flight[i] if i < ahead else None)
            if ban is True:
                bias[word[-1]] = float("-inf")
            elif ban is not None:        # decided by the token in flight
                waiting.append((j, word[-1], word[-2], ban))
        allowed += [(j, t) for t in p.allowed_token_ids]
        penalised = p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
        response = b.token_ids if penalised else []
        if penalised and i < ahead:
            pending.append((j, in_flight[i]))
        prompt = r.large_prompt_ids if p.repetition_penalty != 1.0 else []
        tokens = np.asarray(list(prompt) + list(response), dtype=np.int32)
        in_response = np.r_[np.zeros(len(prompt), np.int32), np.ones(len(response), np.int32)]
        occurrences.append(np.stack([np.full(tokens.size, j, np.int32), tokens, in_response]))
        biased.append(np.array([[j] * len(bias), list(bias)], np.int32).reshape(2, -1))
        biases += list(bias.values())
    occurrences = np.concatenate(occurrences, axis=1)
    biased = np.concatenate(biased, axis=1)
    factors = np.array([[r.params.presence_penalty, r.params.frequency_penalty,
                         r.params.repetition_penalty] for _, r, _ in picked], dtype=np.float32)
    words = np.concatenate([np.array([i for i, _, _ in picked], np.int32), occurrences.ravel(),
                            biased.ravel(), factors.T.ravel().view(np.int32),
                            np.asarray(biases, np.float32).view(np.int32),
                            np.asarray(pending, np.int32).reshape(-1, 2).T.ravel(),
                            np.asarray(allowed, np.int32).reshape(-1, 2).T.ravel(),
                            np.asarray(waiting, np.int32).reshape(-1, 4).T.ravel()])
    return words, (len(picked), occurrences.shape[1], biased.shape[1], len(pending),
                   len(allowed), len(waiting))


def bad_word_ban(word: tuple[int, ...], tokens: list[int], in_flight_row: int | None):
    """Whether a bad word's last token is banned at a beam's next token: True where its tokens
    end with the rest of the word (a one-token word: always), None where they do not. With
    the beam's last token still in flight (in_flight_row: the row of the step that sampled
    it, async scheduling), the row where the known tokens match all but that last one: the
    device bans it if that token is the word's one before last."""
    rest = word[:-1]
    if in_flight_row is None or not rest:
        return True if not rest or tuple(tokens[-len(rest):]) == rest and \
            len(tokens) >= len(rest) else None
    known = rest[:-1]          # the tokens before the one in flight
    if len(tokens) < len(known) or known and tuple(tokens[-len(known):]) != known:
        return None
    return in_flight_row


def adjustment_tensors(words: torch.Tensor, R: int, N: int, M: int, E: int = 0, A: int = 0,
                       C: int = 0, in_flight: torch.Tensor | None = None):
    """adjustment_words on the device -> adjust_logits' arguments after the logits; the E
    tokens in flight are gathered from `in_flight` (the tokens [P] of the step that sampled
    them) into the occurrences, and the C bans that wait on them become biases (-inf where
    the token in flight is the one the ban needs, else 0)."""
    rows = words[:R].long()
    at = R
    occurrences = words[at:at + 3 * N].view(3, N).long()
    at += 3 * N
    biased = words[at:at + 2 * M].view(2, M).long()
    at += 2 * M
    factors = words[at:at + 3 * R].view(torch.float32).view(3, R)
    at += 3 * R
    bias = words[at:at + M].view(torch.float32)
    at += M
    if E:
        row, source = words[at:at + 2 * E].view(2, E).long()
        occurrences = torch.cat([occurrences, torch.stack(
            [row, in_flight[source], torch.ones_like(row)])], dim=1)
    at += 2 * E
    allowed = words[at:at + 2 * A].view(2, A).long()
    at += 2 * A
    if C:
        row, token, needed, source = words[at:at + 4 * C].view(4, C).long()
        biased = torch.cat([biased, torch.stack([row, token])], dim=1)
        bias = torch.cat([bias, torch.where(in_flight[source] == needed, float("-inf"),
                                            0.0).float()])
    return rows, occurrences, factors[0], factors[1], factors[2], biased, bias, allowed


def sampling_tensors(words: torch.Tensor, n: int):
    """sampling_words on the device -> (temperature, top_k, top_p, seeds, positions, min_p)."""
    w = words.view(SAMPLING_WORDS, n)
    seeds = (w[4].long() << 32) | (w[3].long() & 0xFFFFFFFF)
    return (w[0].view(torch.float32), w[2], w[1].view(torch.float32), seeds, w[5].long(),
            w[6].view(torch.float32))
