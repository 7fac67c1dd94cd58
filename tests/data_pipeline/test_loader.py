"""Sampler, DP×CP splitting, resume, prefetch, blending and validation batches."""
import itertools

import numpy as np
import pytest
import torch

from data_pipeline.blend import BlendedDataset, interleave
from data_pipeline.errors import DataConfigError, DataError
from data_pipeline.loader import (DataLoaderConfig, PackedTokens, ResumableSampler, SequenceDataset,
                                  build_train_loader, build_val_loader, cp_shard, parse_data_spec)
from data_pipeline.sequences import document_ids


class RangeDataset:
    """Sample i is the row [i*T, (i+1)*T): every token says which sample and column it is."""

    def __init__(self, n, seq_len=8, tag=0):
        self.n, self.seq_len, self.tag = n, seq_len, tag
        self.vocab_size, self.eos_id, self.tokenizer_sha256 = 1 << 30, -1, None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        row = np.arange(i * self.seq_len, (i + 1) * self.seq_len) + self.tag * 10**6
        return {"input_ids": row, "labels": row + 1, "doc_ids": np.zeros(self.seq_len, np.int32)}


def test_document_ids_start_after_each_eos():
    ids = document_ids(np.array([5, 2, 7, 7, 2, 2, 9]), eos_id=2)
    assert ids.dtype == np.int32 and ids.tolist() == [0, 0, 1, 1, 1, 2, 3]


def test_sequence_dataset_shifted_labels_and_doc_ids(prepared):
    tokens = PackedTokens(prepared, "train")
    dataset = SequenceDataset(tokens, 32)
    for i in (0, 7, len(dataset) - 1):
        item = dataset[i]
        window = tokens.read(i * 32, 33)
        assert np.array_equal(item["input_ids"], window[:-1]) and np.array_equal(item["labels"], window[1:])
        eos = np.flatnonzero(item["input_ids"] == tokens.eos_id)
        expected = np.searchsorted(eos, np.arange(32), side="left")  # EOS before position t
        assert np.array_equal(item["doc_ids"], expected)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_sampler_epochs_are_permutations_and_deterministic():
    a = ResumableSampler(50, 10, seed=3)
    batches = [a.next_batch() for _ in range(10)]  # 5 batches per epoch
    assert sorted(itertools.chain(*batches[:5])) == list(range(50))
    assert sorted(itertools.chain(*batches[5:])) == list(range(50))
    assert batches[:5] != batches[5:]
    b = ResumableSampler(50, 10, seed=3)
    assert [b.next_batch() for _ in range(10)] == batches
    assert ResumableSampler(50, 10, seed=3, shuffle=False).next_batch() == list(range(10))
    tail = ResumableSampler(53, 10, seed=1)
    assert [len(tail.next_batch()) for _ in range(6)] == [10] * 6 and tail.epoch == 1  # incomplete batch dropped


def global_batches(dp_size, steps, state=None, num_samples=103, batch=12, seed=7):
    """Global batches seen by a run of `dp_size` ranks (rank pieces concatenated), and its final state."""
    samplers = [ResumableSampler(num_samples, batch, r, dp_size, seed) for r in range(dp_size)]
    if state is not None:
        for s in samplers:
            s.load_state_dict(state)
    out = [sum((s.next_batch() for s in samplers), []) for _ in range(steps)]
    return out, samplers[0].state_dict()


def test_dp_ranks_split_the_global_batch_exactly():
    for dp_size in (1, 2, 3, 4):
        batches, _ = global_batches(dp_size, 12)
        assert batches == global_batches(1, 12)[0]
        assert all(len(set(b)) == 12 for b in batches)


@pytest.mark.parametrize("resume_dp", [2, 4, 6])
def test_resume_mid_epoch_with_changed_dp_size(resume_dp):
    reference, _ = global_batches(2, 20)              # 8 batches per epoch: crosses two epoch ends
    first, state = global_batches(2, 11)
    assert state["epoch"] == 1 and state["samples_in_epoch"] == 36
    rest, final = global_batches(resume_dp, 9, state)
    assert first + rest == reference
    assert final["consumed_samples"] == 20 * 12 and final["epoch"] == 2


def consumed(dp, micro, accum, steps, state=None, num_samples=103, seed=7):
    """Sample ids in the order a trainer with ``dp`` ranks × ``accum`` micro-batches of ``micro``
    consumes them (one loader step = one micro-batch of every rank), and the position after."""
    samplers = [ResumableSampler(num_samples, micro * dp, r, dp, seed, step_size=micro * dp * accum)
                for r in range(dp)]
    for s in samplers:
        if state is not None:
            s.load_state_dict(state)
    ids = [i for _ in range(steps * accum) for s in samplers for i in s.next_batch()]
    return ids, samplers[0].state_dict()


def test_fixed_global_batch_gives_the_same_samples_whatever_dp_and_accumulation():
    """A global batch of 12 as DP 4 × 1, DP 2 × 2 or DP 1 × 4 accumulation: the same ids in the same
    order, epochs ending after the last whole step (96 of 103 samples), also across resumes that
    change the layout (elastic resume: DP 4 → 2 → 1)."""
    reference, _ = consumed(4, 3, 1, 20)  # 8 steps per epoch: crosses two epoch ends
    for dp, accum in ((2, 2), (1, 4)):
        assert consumed(dp, 3, accum, 20)[0] == reference
    a, state = consumed(4, 3, 1, 7)
    b, state = consumed(2, 3, 2, 6, state)
    c, state = consumed(1, 3, 4, 7, state)
    assert a + b + c == reference
    assert state["consumed_samples"] == 20 * 12 and state["epoch"] == 2
    assert sorted(reference[:96]) == sorted(set(reference[:96]))  # no sample twice in an epoch
    # without step_size the epoch of DP 1 × 4 would end after 102 samples: another order
    plain = ResumableSampler(103, 3, 0, 1, 7)
    assert [i for _ in range(80) for i in plain.next_batch()] != reference


def test_resume_refuses_other_data():
    state = ResumableSampler(100, 10, seed=1).state_dict()
    with pytest.raises(DataError, match="num_samples"):
        ResumableSampler(90, 10, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        ResumableSampler(100, 10, seed=2).load_state_dict(state)
    with pytest.raises(DataConfigError):
        ResumableSampler(100, 10, dp_size=3)
    with pytest.raises(DataError, match="fewer than one global batch"):
        ResumableSampler(5, 10)


def loader(dataset, dp_rank=0, dp_size=1, cp_rank=0, cp_size=1, prefetch=0, batch=8, seed=1):
    from data_pipeline.loader import TrainLoader

    sampler = ResumableSampler(len(dataset), batch, dp_rank, dp_size, seed)
    return TrainLoader(dataset, sampler, cp_rank, cp_size, prefetch)


def test_dp_cp_pieces_cover_every_token_of_the_global_batch_once():
    dataset = RangeDataset(40, seq_len=12)
    reference = loader(dataset)
    expected = [next(reference)["input_ids"] for _ in range(7)]
    for dp_size, cp_size in [(2, 2), (4, 3), (1, 4), (8, 1)]:
        ranks = {(d, c): loader(dataset, d, dp_size, c, cp_size) for d in range(dp_size) for c in range(cp_size)}
        for step in range(7):
            pieces = {key: next(rank) for key, rank in ranks.items()}
            assert all(t.shape == (8 // dp_size, 12 // cp_size) for b in pieces.values() for t in b.values())
            rows = [torch.cat([pieces[d, c]["input_ids"] for c in range(cp_size)], dim=1) for d in range(dp_size)]
            rebuilt = torch.cat(rows, dim=0)
            assert torch.equal(rebuilt, expected[step])
            tokens = rebuilt.flatten()
            assert len(tokens.unique()) == tokens.numel() == 8 * 12


def test_cp_shard():
    x = torch.arange(24).view(2, 12)
    assert cp_shard(x, 1, 3).tolist() == [[4, 5, 6, 7], [16, 17, 18, 19]]
    assert cp_shard(x, 0, 2, dim=0).tolist() == [list(range(12))]
    with pytest.raises(DataConfigError, match="not divisible"):
        cp_shard(x, 0, 5)
    with pytest.raises(DataConfigError, match="not divisible"):
        build_train_loader(DataLoaderConfig(data="synthetic", seq_len=10), cp_size=4)


def test_prefetch_yields_the_same_batches_and_resumes_exactly(prepared):
    cfg = DataLoaderConfig(data=str(prepared), seq_len=16, global_batch_size=4, seed=5, prefetch=0)
    plain = build_train_loader(cfg, 1, 2, 1, 2)
    fetched = build_train_loader(DataLoaderConfig(**{**cfg.__dict__, "prefetch": 3}), 1, 2, 1, 2)
    steps = 3 * len(plain.dataset) // 4  # beyond one epoch
    plain_batches = [next(plain) for _ in range(steps)]
    for expected in plain_batches[:10]:
        got = next(fetched)
        assert all(torch.equal(got[k], expected[k]) and got[k].dtype == torch.int64 for k in expected)
    state = fetched.state_dict()  # the position of what was returned, not of what was prefetched
    assert state["consumed_samples"] == 10 * 4
    resumed = build_train_loader(DataLoaderConfig(**{**cfg.__dict__, "prefetch": 2}), 1, 2, 1, 2)
    resumed.load_state_dict(state)
    for expected in plain_batches[10:]:
        assert torch.equal(next(resumed)["input_ids"], expected["input_ids"])
    fetched.load_state_dict(state)  # rewinding a running prefetcher works too
    assert torch.equal(next(fetched)["labels"], plain_batches[10]["labels"])
    fetched.close()


def test_prefetch_thread_errors_reach_the_caller():
    class Broken(RangeDataset):
        def __getitem__(self, i):
            raise DataError("disk on fire")

    with pytest.raises(DataError, match="disk on fire"):
        next(loader(Broken(16), prefetch=2))


def test_blend_weights_and_determinism():
    parts = [(RangeDataset(30, tag=0), 0.7), (RangeDataset(500, tag=1), 0.2), (RangeDataset(80, tag=2), 0.1)]
    blend = BlendedDataset(parts, seed=3, num_samples=1000)
    counts = blend.counts()
    assert np.all(np.abs(counts - np.array([700, 200, 100])) <= 1)
    # every prefix is within one sample of its share
    for prefix in (10, 97, 333):
        share = np.bincount(blend.dataset_index[:prefix], minlength=3)
        assert np.all(np.abs(share - prefix * blend.weights) <= 1)
    tags = [blend[i]["input_ids"][0] // 10**6 for i in range(1000)]
    assert np.array_equal(tags, blend.dataset_index)
    # the small dataset is repeated: every sample used before any is reused, orders differ per pass
    first_uses = blend.sample_index[blend.dataset_index == 0]
    assert sorted(first_uses[:30]) == list(range(30)) and not np.array_equal(first_uses[:30], first_uses[30:60])
    again = BlendedDataset(parts, seed=3, num_samples=1000)
    assert np.array_equal(again.sample_index, blend.sample_index)
    other = BlendedDataset(parts, seed=4, num_samples=1000)
    assert not np.array_equal(other.sample_index, blend.sample_index)
    with pytest.raises(DataConfigError):
        BlendedDataset([(RangeDataset(3), 0.0)])


def test_interleave_counts_for_many_weights():
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = rng.dirichlet(np.ones(rng.integers(2, 6)))
        owner, rank = interleave(w, 5000)
        assert np.all(np.abs(np.bincount(owner, minlength=len(w)) - 5000 * w) <= 1)
        for d in range(len(w)):
            assert np.array_equal(rank[owner == d], np.arange((owner == d).sum()))


def test_blend_from_data_spec(prepared):
    assert parse_data_spec("0.7:a, 3:b,c") == [("a", 0.7), ("b", 3.0), ("c", 1.0)]
    cfg = DataLoaderConfig(data=f"0.75:{prepared},0.25:{prepared}", seq_len=16, global_batch_size=4)
    train = build_train_loader(cfg)
    assert isinstance(train.dataset, BlendedDataset) and len(train.dataset) == 2 * len(SequenceDataset(
        PackedTokens(prepared), 16))
    assert next(train)["input_ids"].shape == (4, 16)
    assert len(build_val_loader(cfg)) >= 1


def test_val_loader_is_a_fixed_ordered_pass(prepared):
    cfg = DataLoaderConfig(data=str(prepared), seq_len=8, global_batch_size=4, val_batches=5)
    ranks = [build_val_loader(cfg, d, 2) for d in range(2)]
    assert len(ranks[0]) == 5
    first = [list(v) for v in ranks]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first[0], list(ranks[0])))
    val = SequenceDataset(PackedTokens(prepared, "val"), 8)
    stacked = torch.cat([torch.cat([first[0][b]["input_ids"], first[1][b]["input_ids"]]) for b in range(5)])
    assert torch.equal(stacked, torch.from_numpy(np.stack([val[i]["input_ids"] for i in range(20)])))
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_val_loader(DataLoaderConfig(data=str(prepared), seq_len=8, global_batch_size=4096))


def test_unknown_data_source():
    with pytest.raises(DataError, match="data folder not found"):
        build_train_loader(DataLoaderConfig(data="/no/such/folder"))


def test_validation_loss_is_token_weighted():
    """parallel.loss.validation_loss (the trainer's evaluation) over the val loader."""
    from parallel import ParallelDims, validation_loss

    single = ParallelDims()
    cfg = DataLoaderConfig(data="mqar", seq_len=64, global_batch_size=4, val_batches=3)
    vocab = cfg.synthetic.vocab_size
    uniform = validation_loss(lambda b: torch.zeros(*b["input_ids"].shape, vocab), build_val_loader(cfg), single)
    assert uniform["tokens"] == 3 * 4 * cfg.synthetic.num_kv_pairs  # only the answers are labelled
    assert abs(uniform["loss"] - np.log(vocab)) < 1e-5 and abs(uniform["perplexity"] - vocab) < 1e-2

    def oracle(batch):  # knows the answers: loss 0
        return torch.nn.functional.one_hot(batch["labels"].clamp(min=0), vocab).float() * 1e4

    assert validation_loss(oracle, build_val_loader(cfg), single)["loss"] < 1e-6


def test_loader_exposes_model_settings(prepared):
    train = build_train_loader(DataLoaderConfig(data=str(prepared), seq_len=8, global_batch_size=2))
    assert (train.vocab_size, train.eos_id) == (400, 2) and train.tokenizer_path == prepared / "tokenizer.model"
    synthetic = build_train_loader(DataLoaderConfig(data="synthetic", seq_len=8, global_batch_size=2))
    assert synthetic.tokenizer_path is None and synthetic.vocab_size == 256
