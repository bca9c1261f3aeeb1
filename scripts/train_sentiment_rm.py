"""Make the sentiment reward model: SmolLM2-135M-Instruct + LoRA + a one-output score head.

    python scripts/train_sentiment_rm.py [--loss regression|bt] [--epochs 2] [--out DIR]

From nothing but the bundled models, the way scripts/train_sentiment_adapter.py made the DPO
adapter:
1. data: continuations of the 185 training and 50 dev openings sampled from the task's large
   model itself (Gemma-3-270M base under TEMPLATES['large'], `samples` each, 40 tokens,
   temperature 1.0: the distribution the reward model scores at search time) and, for the
   training openings, `small_samples` more from SmolLM2-135M-Instruct (bare opening; none by
   default, to keep training near 20 minutes on 2 CPU cores); cached as json under
   --cache-dir, so reruns do not resample;
2. labels: the gold reward, VADER compound of opening + continuation;
3. model: SmolLM2-135M-Instruct as AutoModelForSequenceClassification(num_labels=1) with a
   LoRA (r=8 on q/k/v/o) and the score head trained in full (modules_to_save), CPU fp32;
4. loss: "bt" (the default: pairwise Bradley-Terry on all pairs of continuations of one
   opening, soft labels sigmoid((r_a - r_b) / T)) or "regression" (squared error to the VADER
   compound). In a pilot on 80 openings BT reached dev pair accuracy 0.64 in 40 steps where
   the regression was still near predicting the mean (0.54): the regression spends its signal
   on each opening's level, BT trains only the order within an opening, what a search compares
   (bench/results/rm_training.json, loss_choice);
5. early stopping: the dev pairwise accuracy (pairs of Gemma continuations of one dev opening
   ordered as VADER orders them) is measured a few times an epoch; the best is kept.

THE RENDERING CONTRACT (the engine scores exactly this way): for a template with "{prompt}"
before "{response}", prefix = template.split("{response}")[0].replace("{prompt}", prompt),
suffix = template.split("{response}")[1], and
    ids = tok(prefix + response, add_special_tokens=False).input_ids
          + tok(suffix, add_special_tokens=False).input_ids;
the reward is the score head's output (index 0, fp32) at the LAST token of ids. The template
is written into the shipped folder's w2s_scorer.json.

Writes the adapter (adapter_config names the bundled base, task SEQ_CLS), w2s_scorer.json, and
the curve with the dev fidelity numbers (bench/results/rm_training.json).
"""

import argparse
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sentiment_data import cached_samples

ROOT = Path(__file__).resolve().parents[1]
BASE = "smollm2-135m-instruct"
# <|endoftext|> (id 0), not <|im_end|>: SmolLM2's pad token is <|im_end|> (id 2), and
# transformers' own sequence-classification pooling reads the rightmost non-pad token, so a
# <|im_end|> suffix would be skipped there; <|endoftext|> is read the same by both.
TEMPLATE = "Movie review: {prompt}{response}<|endoftext|>"
PREFIXES = (5, 10, 25, 50)   # large-model tokens, as bench/implicit_reward_fidelity.py


# ---------------------------------------------------------------- the rendering contract

def split_template(template: str) -> tuple[str, str]:
    if template.count("{response}") != 1 or "{prompt}" not in template.split("{response}")[0]:
        raise ValueError(f"template {template!r}: needs '{{prompt}}' before one '{{response}}'")
    before, suffix = template.split("{response}")
    return before, suffix


def render_ids(tok, template: str, prompt: str, response: str) -> list[int]:
    before, suffix = split_template(template)
    prefix = before.replace("{prompt}", prompt)
    return (tok(prefix + response, add_special_tokens=False).input_ids
            + tok(suffix, add_special_tokens=False).input_ids)


def score_rows(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """The head at each row's last token: right-padded batch, fp32, [len(rows)]."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    net = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = net.model(input_ids=ids, attention_mask=mask).last_hidden_state
    last = torch.tensor([len(r) - 1 for r in rows])
    return net.score(hidden[torch.arange(len(rows)), last]).float()[:, 0]


def score_all(model, rows, pad_id, batch=32) -> list[float]:
    """score_rows over many rows, no grad, batched by length (less padding)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = [0.0] * len(rows)
    with torch.no_grad():
        for b0 in range(0, len(order), batch):
            idx = order[b0:b0 + batch]
            for i, s in zip(idx, score_rows(model, [rows[i] for i in idx], pad_id).tolist()):
                out[i] = s
    return out


# ---------------------------------------------------------------- fidelity measures

def pair_accuracy(scores: list[list[float]], gold: list[list[float]]) -> float:
    """Over all pairs of continuations of one opening (gold ties and score ties skipped), the
    fraction the scores order as the gold reward does: bench/implicit_reward_fidelity.py's
    `agreement`."""
    agree = total = 0
    for s, g in zip(scores, gold):
        for i, j in itertools.combinations(range(len(g)), 2):
            if g[i] == g[j] or s[i] == s[j]:
                continue
            total += 1
            agree += (s[i] > s[j]) == (g[i] > g[j])
    return agree / max(total, 1)


def _ranks(xs):
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs, ys) -> float:
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else 0.0


def fidelity(scores: list[list[float]], gold: list[list[float]]) -> dict:
    """Pairwise accuracy, Spearman over all continuations pooled, and the mean Spearman within
    an opening (what a search compares), and Best-of-n's gold reward within these samples."""
    within = [spearman(s, g) for s, g in zip(scores, gold) if len(set(g)) > 1]
    picked = [g[max(range(len(g)), key=s.__getitem__)] for s, g in zip(scores, gold)]
    return {"pair_accuracy": round(pair_accuracy(scores, gold), 4),
            "spearman": round(spearman(list(itertools.chain(*scores)),
                                       list(itertools.chain(*gold))), 4),
            "spearman_within": round(statistics.mean(within), 4),
            "bon_gold": round(statistics.mean(picked), 4)}


# ---------------------------------------------------------------- data

def labelled(rows: list[dict], tok, template: str) -> list[dict]:
    """One item per opening: its continuations' rendered ids and VADER labels."""
    from w2s_engine.tasks.sentiment import gold_reward
    items = []
    for row in rows:
        texts = row["texts"]
        items.append({"prompt": row["prompt"], "texts": texts,
                      "ids": [render_ids(tok, template, row["prompt"], t) for t in texts],
                      "gold": gold_reward([row["prompt"] + t for t in texts])})
    return items


def merge(*sources: list[dict]) -> list[dict]:
    """The continuations of each opening from several samplers, in one item."""
    out = [dict(x) for x in sources[0]]
    for src in sources[1:]:
        for o, x in zip(out, src):
            assert o["prompt"] == x["prompt"]
            for k in ("texts", "ids", "gold"):
                o[k] = o[k] + x[k]
    return out


# ---------------------------------------------------------------- training

def load_classifier(rank: int, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from w2s_engine.models.loader import _resolve
    source = str(_resolve(BASE))   # the bundled GGUF's converted safetensors checkpoint
    torch.manual_seed(seed)        # the score head's initialisation
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model = get_peft_model(model, LoraConfig(
        task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=["score"]))
    return model, tok, source


def item_loss(scores: torch.Tensor, gold: list[float], loss: str, bt_temperature: float):
    g = torch.tensor(gold)
    if loss == "regression":
        return ((scores - g) ** 2).mean()
    i, j = torch.triu_indices(len(gold), len(gold), offset=1)
    keep = g[i] != g[j]
    i, j = i[keep], j[keep]
    if len(i) == 0:
        return scores.sum() * 0.0
    target = torch.sigmoid((g[i] - g[j]) / bt_temperature)
    return torch.nn.functional.binary_cross_entropy_with_logits(scores[i] - scores[j], target)


def split(flat: list, items: list[dict]) -> list[list]:
    """A flat list over all continuations of `items`, cut back into one list per opening."""
    out, k = [], 0
    for it in items:
        out.append(flat[k:k + len(it["ids"])])
        k += len(it["ids"])
    return out


def evaluate(model, dev: list[dict], pad_id: int) -> dict:
    flat_scores = score_all(model, [ids for it in dev for ids in it["ids"]], pad_id)
    scores = split(flat_scores, dev)
    gold = [it["gold"] for it in dev]
    mse = statistics.mean((s - g) ** 2 for s, g in zip(flat_scores, itertools.chain(*gold)))
    return {**{f"dev_{k}": v for k, v in fidelity(scores, gold).items()},
            "dev_mse": round(mse, 4), "dev_score_mean": round(statistics.mean(flat_scores), 4)}


def train(model, tok, items, dev, args, log):
    pad_id = tok.pad_token_id
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    steps_per_epoch = -(-len(items) // args.batch)
    total = args.epochs * steps_per_epoch
    eval_every = max(1, steps_per_epoch // args.evals_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(     # 5% warm-up, then constant
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 20)))
    t0 = time.time()
    row = {"step": 0, **evaluate(model, dev, pad_id), "seconds": round(time.time() - t0, 1)}
    log.append(row)
    print(json.dumps(row), flush=True)
    best = {"acc": row["dev_pair_accuracy"], "step": 0,
            "state": {n: p.detach().clone() for n, p in trainable.items()}}
    step = 0
    for epoch in range(args.epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        for b0 in range(0, len(order), args.batch):
            group = [items[i] for i in order[b0:b0 + args.batch]]
            model.train()
            scores = score_rows(model, [ids for it in group for ids in it["ids"]], pad_id)
            losses, k = [], 0
            for it in group:
                n = len(it["ids"])
                losses.append(item_loss(scores[k:k + n], it["gold"], args.loss,
                                        args.bt_temperature))
                k += n
            loss = torch.stack(losses).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            model.eval()
            step += 1
            gold = [g for it in group for g in it["gold"]]
            row = {"step": step, "epoch": epoch, "loss": round(loss.item(), 4),
                   "train_pair_accuracy": round(pair_accuracy(
                       split(scores.tolist(), group), [it["gold"] for it in group]), 4),
                   "score_mean": round(scores.mean().item(), 4),
                   "gold_mean": round(statistics.mean(gold), 4)}
            if step % eval_every == 0 or step == total:
                row.update(evaluate(model, dev, pad_id))
                if row["dev_pair_accuracy"] > best["acc"]:   # early stopping on dev
                    best = {"acc": row["dev_pair_accuracy"], "step": step,
                            "state": {n: p.detach().clone() for n, p in trainable.items()}}
            row["seconds"] = round(time.time() - t0, 1)
            log.append(row)
            print(json.dumps(row), flush=True)
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(best["state"][n])
    print(f"kept the model of step {best['step']} (dev pair accuracy {best['acc']:.4f})",
          flush=True)
    return best["step"], round(time.time() - t0, 1)


# ---------------------------------------------------------------- comparisons

def implicit_scorer():
    """The shipped DPO pair (SmolLM2 + DPO adapter vs SmolLM2) in an engine, for its implicit
    reward of the same continuations (engine.score)."""
    from w2s_engine import Engine
    from w2s_engine.tasks.sentiment import LARGE, SMALL, TEMPLATES, TUNED
    return Engine(large=LARGE, tuned=TUNED, untuned=SMALL, templates=TEMPLATES, progress=False)


def implicit_rewards(engine, rows: list[dict], n=None) -> list[list[float]]:
    """The implicit reward of each row's continuations (of their first n large tokens)."""
    out = []
    for r in rows:
        texts, finished = _prefixes(r, n, engine.models["large"].tokenizer)
        out.append(engine.score([r["prompt"]] * len(texts), texts, finished=finished))
    return out


def _prefixes(row, n, large_tok):
    """The texts of a row's first n large tokens (all of it for None), and finished flags as
    bench/implicit_reward_fidelity.py passes them."""
    if n is None:
        return row["texts"], row["finished"]
    texts = [large_tok.decode(t[:n], skip_special_tokens=True) for t in row["token_ids"]]
    done = [f and len(t) <= n for f, t in zip(row["finished"], row["token_ids"])]
    return texts, done


def _shown(value):
    """A path setting relative to the repository or the home directory, as it is recorded."""
    if isinstance(value, str) and value.startswith("/"):
        for base, name in ((ROOT, ""), (Path.home(), "~/")):
            try:
                return name + str(Path(value).relative_to(base))
            except ValueError:
                pass
    return value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", choices=["regression", "bt"], default="bt")
    ap.add_argument("--samples", type=int, default=8, help="Gemma continuations per opening")
    ap.add_argument("--small-samples", type=int, default=0,
                    help="SmolLM2 continuations per training opening (0: none)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--template", default=TEMPLATE)
    ap.add_argument("--bt-temperature", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--evals-per-epoch", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=2, help="openings per step (all their pairs)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--limit", type=int, default=None, help="first N train openings (pilot)")
    ap.add_argument("--dev-limit", type=int, default=None, help="first N dev openings (pilot)")
    ap.add_argument("--no-compare", action="store_true",
                    help="skip the DPO pair's numbers on the same dev samples")
    from w2s_engine.models.loader import cache_dir
    ap.add_argument("--cache-dir", default=str(cache_dir() / "sentiment-rm"))
    ap.add_argument("--out", default=str(ROOT / "w2s_engine" / "data" / "sentiment-rm-lora"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "rm_training.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from w2s_engine.tasks.sentiment import LARGE, SMALL, TEMPLATES, sentiment_prompts
    train_p, dev_p = sentiment_prompts("train"), sentiment_prompts("dev")
    t0 = time.time()
    # Sampled in one call each (train + dev together), whatever --limit says: one cache.
    gemma = cached_samples(args.cache_dir, LARGE, train_p + dev_p, args.samples,
                           args.max_new_tokens, args.seed, TEMPLATES["large"])
    sampling = {"gemma": gemma["seconds"]}
    model, tok, source = load_classifier(args.rank, args.seed)
    items = labelled(gemma["rows"][:len(train_p)], tok, args.template)
    dev_rows = gemma["rows"][len(train_p):]
    if args.small_samples:
        smol = cached_samples(args.cache_dir, SMALL, train_p + dev_p, args.small_samples,
                              args.max_new_tokens, args.seed)
        sampling["smollm2"] = smol["seconds"]
        items = merge(items, labelled(smol["rows"][:len(train_p)], tok, args.template))
    items = items[:args.limit]
    dev_rows = dev_rows[:args.dev_limit]
    dev = labelled(dev_rows, tok, args.template)
    print(f"{len(items)} training openings ({sum(len(i['ids']) for i in items)} continuations), "
          f"{len(dev)} dev openings ({sum(len(i['ids']) for i in dev)} Gemma continuations); "
          f"rendered like {tok.decode(dev[0]['ids'][0])!r}", flush=True)

    log = []
    kept_step, train_seconds = train(model, tok, items, dev, args, log)
    final = evaluate(model, dev, tok.pad_token_id)

    out = Path(args.out)
    model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE   # a bundled name: loads anywhere the demo extra is
    cfg["modules_to_save"] = list(dict.fromkeys(cfg["modules_to_save"]))   # peft repeats it
    cfg_path.write_text(json.dumps(cfg, indent=2))
    suffix = split_template(args.template)[1]
    (out / "w2s_scorer.json").write_text(json.dumps({
        "kind": "reward_model", "template": args.template, "special_tokens": False,
        "head_index": 0, "base": BASE,
        "notes": (
            "reward(prompt, response) = the score head (output index 0, fp32) at the LAST token "
            "of tok(prefix + response, add_special_tokens=False).input_ids + tok(suffix, "
            "add_special_tokens=False).input_ids, where prefix = template.split('{response}')"
            "[0].replace('{prompt}', prompt) and suffix = template.split('{response}')[1] "
            f"(here {suffix!r}, token ids {tok(suffix, add_special_tokens=False).input_ids}); "
            "no BOS. Load: AutoModelForSequenceClassification(num_labels=1) of the base + this "
            "LoRA (task SEQ_CLS, score head in modules_to_save). The suffix is not the pad "
            f"token (id {tok.pad_token_id}), so transformers' own pooling of an unpadded or "
            "right-padded rendering reads the same token. Trained with "
            + ("a squared error to VADER compound: the score estimates the compound score "
               "of prompt + response, in [-1, 1] roughly."
               if args.loss == "regression" else
               "a pairwise Bradley-Terry loss within an opening: only differences of scores "
               "between responses of one prompt mean something.")
            + " Trained on whole 40-token continuations of the task's openings.")},
        indent=2) + "\n")

    # Reload from the written files exactly as a user would, and check the scores agree.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1,
                                                              dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    probe = [ids for it in dev[:4] for ids in it["ids"]]
    a = torch.tensor(score_all(model, probe, tok.pad_token_id))
    b = torch.tensor(score_all(reloaded, probe, tok.pad_token_id))
    with torch.no_grad():   # transformers' own pooling, one unpadded rendering at a time
        c = torch.tensor([reloaded(input_ids=torch.tensor([ids])).logits[0, 0].item()
                          for ids in probe])
    reload_diff = max((a - b).abs().max().item(), (a - c).abs().max().item())
    print(f"reloaded from {out}: max score difference {reload_diff:.2e}", flush=True)
    assert reload_diff < 1e-4, reload_diff

    # Fidelity beside the DPO pair's implicit reward on the same dev samples.
    comparison = {}
    gold_dev = [it["gold"] for it in dev]
    if not args.no_compare:
        engine = implicit_scorer()
        imp = implicit_rewards(engine, dev_rows)
        comparison["dev_samples"] = {"reward_model": {k[4:]: v for k, v in final.items()
                                                      if k[4:] in ("pair_accuracy", "spearman",
                                                                   "spearman_within",
                                                                   "bon_gold")},
                                     "implicit_dpo_pair": fidelity(imp, gold_dev)}
        # The samples of bench/implicit_reward_fidelity.py (dev, 8 x 50 tokens, temperature
        # 0.7, top_k 50, seed 0), scored on prefixes of 5/10/25/50 large tokens as it does.
        bench = cached_samples(args.cache_dir, LARGE, dev_p[:args.dev_limit], 8, 50, 0,
                               TEMPLATES["large"], temperature=0.7, top_k=50)
        from transformers import AutoTokenizer

        from w2s_engine.models.loader import _resolve
        large_tok = AutoTokenizer.from_pretrained(str(_resolve(LARGE)))
        gold_b = [labelled([r], tok, args.template)[0]["gold"] for r in bench["rows"]]
        rows = []
        for n in PREFIXES:
            rm_scores = [score_all(model, [render_ids(tok, args.template, r["prompt"], t)
                                           for t in _prefixes(r, n, large_tok)[0]],
                                   tok.pad_token_id) for r in bench["rows"]]
            rows.append({"prefix_tokens": n, "reward_model": fidelity(rm_scores, gold_b),
                         "implicit_dpo_pair": fidelity(implicit_rewards(engine, bench["rows"], n),
                                                       gold_b)})
            print(json.dumps(rows[-1]), flush=True)
        comparison["fidelity_bench_samples"] = {
            "samples": "dev, 8 x 50 Gemma tokens, temperature 0.7, top_k 50, seed 0 (as "
                       "bench/implicit_reward_fidelity.py); prefixes of n large tokens scored, "
                       "gold of the whole continuation",
            "sample_gold": round(statistics.mean(itertools.chain(*gold_b)), 4),
            "oracle_gold": round(statistics.mean(max(g) for g in gold_b), 4),
            "rows": rows}

    from w2s_engine.tasks.sentiment import adapter_fingerprint
    weights = out / "adapter_model.safetensors"
    settings = {k: _shown(v) for k, v in vars(args).items()}
    result = {"settings": settings, "template": args.template, "suffix": suffix,
              "train_openings": len(items),
              "train_continuations": sum(len(i["ids"]) for i in items),
              "dev_openings": len(dev), "dev_continuations": sum(len(i["ids"]) for i in dev),
              "train_gold_mean": round(statistics.mean(g for i in items for g in i["gold"]), 4),
              "dev_gold_mean": round(statistics.mean(itertools.chain(*gold_dev)), 4),
              "kept_step": kept_step, "kept": final, "comparison": comparison,
              "adapter_bytes": weights.stat().st_size,
              "adapter_sha256_12": adapter_fingerprint(str(out)),
              "reload_max_diff": reload_diff, "sampling_seconds": sampling,
              "training_seconds": train_seconds, "total_seconds": round(time.time() - t0, 1),
              "device": "CPU", "threads": torch.get_num_threads(),
              "machine": f"CPU {platform.machine()}, {os.cpu_count()} cores", "curve": log}
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    print(f"reward model in {out}; curve in {args.results}; {time.time() - t0:.0f}s in all")


if __name__ == "__main__":
    main()
