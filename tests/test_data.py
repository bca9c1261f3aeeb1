"""The bundled sentiment prompt set: a few hundred openings, splits that never overlap."""

from w2s_engine.tasks.sentiment import DEMO_PROMPTS, sentiment_prompts


def test_sentiment_prompt_splits_are_disjoint_and_sized_for_train_dev_test():
    train, dev, test = (sentiment_prompts(s) for s in ("train", "dev", "test"))
    assert len(train) + len(dev) + len(test) >= 250 and len(test) >= 50
    assert not (set(train) & set(dev) or set(train) & set(test) or set(dev) & set(test))
    assert all(p and p == p.strip() for p in train + dev + test)


def test_the_demo_runs_on_prompts_the_adapter_never_saw():
    assert len(DEMO_PROMPTS) == 8 and set(DEMO_PROMPTS) <= set(sentiment_prompts("test"))
    assert not set(DEMO_PROMPTS) & set(sentiment_prompts("train"))
