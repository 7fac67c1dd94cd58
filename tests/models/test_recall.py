"""Multi-query associative recall (Zoology's MQAR, generated here): a tiny model of each family
learns it well above chance in a bounded number of CPU steps — the evidence that the inner loop
really learns at test time (the key → value pairs are new in every sequence, so they cannot be
stored in the slow weights; chance is 1/16 over the value vocabulary, 1/4 over the in-context values).
"""
import time

import pytest
import torch

from models import MemoryLMForCausalLM, preset_config

N_PAIRS, N_KEYS, N_VALUES = 4, 16, 16
VOCAB = 1 + N_KEYS + N_VALUES


def mqar_batch(gen: torch.Generator, batch: int):
    """k₁ v₁ … k₄ v₄ then the four keys again in random order, each followed by its value;
    labels (next-token convention of the model: ``labels`` are the inputs, shifted inside) mark
    only the queried values."""
    keys = torch.stack([torch.randperm(N_KEYS, generator=gen)[:N_PAIRS] for _ in range(batch)]) + 1
    values = torch.randint(0, N_VALUES, (batch, N_PAIRS), generator=gen) + 1 + N_KEYS
    order = torch.stack([torch.randperm(N_PAIRS, generator=gen) for _ in range(batch)])
    qk, qv = keys.gather(1, order), values.gather(1, order)
    ids = torch.cat([torch.stack([keys, values], 2).flatten(1), torch.stack([qk, qv], 2).flatten(1)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 2 * N_PAIRS + 1 :: 2] = qv
    return ids, labels


def test_mqar_generator():
    ids, labels = mqar_batch(torch.Generator().manual_seed(0), 3)
    assert ids.shape == (3, 4 * N_PAIRS)
    for row, lab in zip(ids, labels):
        pairs = dict(zip(row[: 2 * N_PAIRS : 2].tolist(), row[1 : 2 * N_PAIRS : 2].tolist()))
        for t in range(2 * N_PAIRS, 4 * N_PAIRS, 2):
            assert pairs[row[t].item()] == row[t + 1].item() == lab[t + 1].item()
        assert (lab[: 2 * N_PAIRS + 1] == -100).all()


def train_and_score(config: dict, steps: int, lr: float = 3e-3, seed: int = 0):
    """AdamW on fresh batches; returns accuracy on 256 held-out sequences and the training time."""
    torch.manual_seed(seed)
    model = MemoryLMForCausalLM(preset_config("test", vocab_size=VOCAB, **config)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and kind to a shared 2-core machine
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            ids, labels = mqar_batch(gen, 32)
            loss = model(ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - t0
        ids, labels = mqar_batch(torch.Generator().manual_seed(10_000 + seed), 256)
        with torch.no_grad():
            pred = model.eval()(ids).logits[:, :-1].argmax(-1)
    finally:
        torch.set_num_threads(threads)
    target = labels[:, 1:]
    mask = target != -100
    return (pred[mask] == target[mask]).float().mean().item(), seconds


# family → (config, optimizer steps, accuracy it must reach). 0.3 is ~5× chance over the values and
# above the 1/4 of guessing among the in-context values; measured accuracies in docs/benchmarks.md
FAMILIES = {
    "deltanet": (dict(memory_layer="deltanet", num_hidden_layers=1, deltanet_chunk_size=8), 400, 0.3),
    "gated_deltanet": (dict(memory_layer="gated_deltanet", num_hidden_layers=1, deltanet_chunk_size=8), 700, 0.3),
    "titans": (dict(memory_layer="titans", num_hidden_layers=1, titans_chunk_size=4), 400, 0.3),
    "titans_mag": (dict(memory_layer="titans_mag", num_hidden_layers=1, titans_chunk_size=4, attention_window=4), 400, 0.3),
    # a hybrid: sliding-window attention (window 4: it cannot see the pairs from the queries) moves
    # each key next to its value, then LaCT stores them in its fast weights (chunk 8: the pairs fill
    # chunk 0, the queries read the weights chunk 0 wrote)
    "swa+lact": (dict(memory_layer="lact", layer_pattern="swa,lact", lact_chunk_size=8, attention_window=4,
                      lact_num_heads=2, lact_base_lr=0.01), 300, 0.3),
    # TNT: local chunk 4 reset every 16 tokens (the whole sequence), global chunk 8
    "tnt": (dict(memory_layer="tnt", num_hidden_layers=1, tnt_global_chunk_size=8, tnt_local_chunk_sizes=[4],
                 tnt_reset_period=16), 300, 0.3),
    # Miras, chunk 4 (measured: Moneta 0.51 after 250 steps, Yaad 0.55 after 300)
    "moneta": (dict(memory_layer="moneta", num_hidden_layers=1, miras_chunk_size=4), 250, 0.3),
    "yaad": (dict(memory_layer="yaad", num_hidden_layers=1, miras_chunk_size=4), 300, 0.3),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_model_learns_recall(family):
    config, steps, threshold = FAMILIES[family]
    acc, seconds = train_and_score(config, steps)
    assert acc >= threshold, (family, acc, seconds)


# Slower learners on this task (more steps than the ~30 s budget of the default run).
SLOW_FAMILIES = {
    # MAL with the inner lr this task needs (the language-model default titans_base_lr = 0.01, docs/models.md,
    # stays at 0.09 here after 1000 steps; MAG and the memory alone reach 0.3 with it)
    "titans_mal": (dict(memory_layer="titans_mal", num_hidden_layers=1, titans_chunk_size=4, attention_window=4,
                        titans_base_lr=0.1), 1000, 0.3),
    "swa+titans_mac": (dict(memory_layer="titans_mac", layer_pattern="swa,titans_mac", attention_window=4,
                            titans_chunk_size=4, titans_segment_size=8), 800, 0.3),
    # Hope: self-modifying memory with chunk 4 (the pairs reach the memories after each 4 tokens), one CMS level
    "hope": (dict(memory_layer="hope", num_hidden_layers=1, hope_chunk_size=4, hope_cms_chunk_sizes=[8],
                  hope_memory_expansion=1), 300, 0.3),
    # Memora (per-token softmax weights: slower steps; 0.45 after 250) and ATLAS with momentum (the dual form;
    # Muon's per-token Newton–Schulz is too slow for a CPU test), window 2: 0.59 after 250 — with the inner
    # step bound this task needs at 16-wide heads (0.1; the language-model default without Muon is 1e-4:
    # at `tiny`'s 561 features 0.1 is NaN at initialisation, docs/models.md "ATLAS")
    "memora": (dict(memory_layer="memora", num_hidden_layers=1, miras_chunk_size=4), 250, 0.3),
    "atlas": (dict(memory_layer="atlas", num_hidden_layers=1, atlas_chunk_size=4, atlas_window=2,
                   inner_optimizer="momentum", atlas_base_lr=0.1), 250, 0.3),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SLOW_FAMILIES))
def test_tiny_model_learns_recall_slow(family):
    config, steps, threshold = SLOW_FAMILIES[family]
    acc, seconds = train_and_score(config, steps)
    assert acc >= threshold, (family, acc, seconds)
