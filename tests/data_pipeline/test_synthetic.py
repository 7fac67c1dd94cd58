"""Synthetic datasets: deterministic by seed, well-formed, usable through the loader."""
import numpy as np
import pytest

from data_pipeline.errors import DataConfigError
from data_pipeline.loader import DataLoaderConfig, build_train_loader, build_val_loader
from data_pipeline.synthetic import IGNORE_INDEX, MarkovLMDataset, MQARDataset, PasskeyDataset

MAKERS = {
    "markov": lambda seed: MarkovLMDataset(128, vocab_size=64, seed=seed, mean_doc_len=40),
    "mqar": lambda seed: MQARDataset(128, vocab_size=64, num_kv_pairs=10, seed=seed),
    "passkey": lambda seed: PasskeyDataset(128, vocab_size=64, passkey_len=6, seed=seed),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_deterministic_by_seed_and_well_typed(name):
    a, b, c = MAKERS[name](1), MAKERS[name](1), MAKERS[name](2)
    for i in (0, 5, 999):
        x, y, z = a[i], b[i], c[i]
        assert all(np.array_equal(x[k], y[k]) for k in x)
        assert not np.array_equal(x["input_ids"], z["input_ids"])
        assert x["input_ids"].shape == x["labels"].shape == x["doc_ids"].shape == (128,)
        assert x["doc_ids"].dtype == np.int32 and x["input_ids"].dtype == np.int64
        assert 0 <= x["input_ids"].min() and x["input_ids"].max() < 64
    assert not np.array_equal(a[0]["input_ids"], a[1]["input_ids"])
    with pytest.raises(IndexError):
        a[len(a)]


def test_markov_walk_follows_its_steps():
    ds = MAKERS["markov"](3)
    span, allowed = ds.vocab_size - 1, set(ds.steps.tolist())
    eos_seen = 0
    for i in range(20):
        item = ds[i]
        tokens = np.append(item["input_ids"], item["labels"][-1])
        assert np.array_equal(item["labels"][:-1], item["input_ids"][1:])
        for prev, nxt in zip(tokens[:-1], tokens[1:]):
            if prev != ds.eos_id and nxt != ds.eos_id:  # inside a document: one of the fixed steps
                assert (nxt - prev) % span in allowed
        eos = item["input_ids"] == ds.eos_id
        eos_seen += eos.sum()
        assert np.array_equal(item["doc_ids"], np.concatenate([[0], np.cumsum(eos[:-1])]))
    assert eos_seen > 20  # documents are ~40 tokens long
    assert 0 < ds.entropy_nats < np.log(len(ds.steps)) + 1e-9


def test_mqar_labels_are_the_values_of_queried_keys():
    ds = MAKERS["mqar"](0)
    for i in range(20):
        item = ds[i]
        x, labels = item["input_ids"], item["labels"]
        pairs = dict(zip(x[0:20:2].tolist(), x[1:20:2].tolist()))
        assert len(pairs) == 10 and max(pairs) < 32 <= min(pairs.values())  # distinct keys, values in upper half
        answered = np.flatnonzero(labels != IGNORE_INDEX)
        assert len(answered) == 10 and answered.min() >= 20
        assert sorted(x[answered].tolist()) == sorted(pairs)
        for pos in answered:
            assert labels[pos] == pairs[int(x[pos])]
            if pos + 1 < len(x):
                assert x[pos + 1] == labels[pos]
    with pytest.raises(DataConfigError):
        MQARDataset(16, vocab_size=64, num_kv_pairs=10)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, None])
def test_passkey_answer_is_the_needle(depth):
    ds = PasskeyDataset(200, vocab_size=64, passkey_len=5, seed=4, depth=depth)
    for i in range(10):
        x, labels = ds[i]["input_ids"], ds[i]["labels"]
        needle = int(np.flatnonzero(x == ds.NEEDLE)[0])
        digits = x[needle + 1:needle + 6]
        answered = np.flatnonzero(labels != IGNORE_INDEX)
        assert np.array_equal(labels[answered], digits) and len(answered) == 5
        assert x[answered[0]] == ds.QUERY and answered[-1] == len(x) - 1
        assert np.all((digits >= ds.DIGIT0) & (digits < ds.DIGIT0 + 10))
        if depth is not None:
            assert abs(needle / (201 - 12) - depth) < 0.01


@pytest.mark.parametrize("task", ["synthetic", "mqar", "passkey"])
def test_tasks_through_the_loader(task):
    cfg = DataLoaderConfig(data=task, seq_len=64, global_batch_size=4, prefetch=1)
    train = next(build_train_loader(cfg, 0, 2, 1, 2))
    assert all(t.shape == (2, 32) for t in train.values())
    val = list(build_val_loader(cfg))
    assert len(val) == cfg.synthetic.num_val_samples // 4
    assert not np.array_equal(val[0]["input_ids"].numpy(), next(build_train_loader(cfg))["input_ids"].numpy())
