"""The bundled sentiment prompt set: a few hundred openings, splits that never overlap."""

from w2s_engine.tasks.sentiment import sentiment_prompts


def test_sentiment_prompt_splits_are_disjoint_and_sized_for_train_dev_test():
    train, dev, test = (sentiment_prompts(s) for s in ("train", "dev", "test"))
    assert len(train) + len(dev) + len(test) >= 250 and len(test) >= 50
    assert not (set(train) & set(dev) or set(train) & set(test) or set(dev) & set(test))
    assert all(p and p == p.strip() for p in train + dev + test)
