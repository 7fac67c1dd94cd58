"""Every registered layer type (models/layers/registry.py) at its registered test sizes, float64: the chunked
form equals the token-by-token reference, one call equals the same tokens fed in pieces through the state, greedy decoding token by token equals the
full forward, the declared fast-weight rule holds, the config round-trips the layer's own fields.
(Packed documents: tests/models/test_varlen.py; the exported folder: tests/models/test_families_model.py;
TP/CP: tests/parallel/test_registry_parallel.py — all parametrised over the registry too.)"""
import pytest
import torch

from models import MemoryLMConfig, MemoryLMForCausalLM, preset_config
from models.layers.registry import LAYERS
from tests.models.helpers import perturb

NAMES = list(LAYERS)


def tiny(name, **overrides):
    torch.manual_seed(0)
    spec = LAYERS[name]
    kind = dict(memory_layer=name) if spec.kind == "memory" else dict(layer_pattern=[name])
    cfg = preset_config("test", num_hidden_layers=2, **kind, **{**spec.test_config, **overrides})
    return perturb(MemoryLMForCausalLM(cfg), 0.05).double().eval()


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_reference(name):
    """The chunked form (``scan_impl="chunk"``) equals the token-by-token reference."""
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        chunk = tiny(name)(ids).logits
        reference = tiny(name, scan_impl="reference")(ids).logits
    assert (chunk - reference).abs().max() <= 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_one_call_equals_pieces(name):
    model = tiny(name)
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        state, parts = None, []
        for a, b in [(0, 5), (5, 6), (6, 17), (17, 23)]:
            out = model(ids[:, a:b], memory_state=state)
            state, parts = out.memory_state, parts + [out.logits]
    assert state.position == 23
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_greedy_decoding_equals_full_forward(name):
    model = tiny(name)
    prompt = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    gen = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    seq = prompt
    for step_logits in gen.logits:
        with torch.no_grad():
            logits = model(seq).logits[:, -1]
        assert (logits - step_logits).abs().max() <= 1e-6
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, gen.sequences)


@pytest.mark.parametrize("name", [n for n in NAMES if LAYERS[n].kind == "memory"])
def test_scan_checkpointing_equals_one_call(name):
    """``scan_checkpoint_group_size`` > 0 (pieces recomputed in the backward; TTT: groups inside its
    scan) gives the same loss and gradients as no checkpointing, from any start position."""
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(4))
    runs = []
    for group in (0, 1, 3):
        model = tiny(name, scan_checkpoint_group_size=group).train()
        prefix = model(ids[:, :3], use_cache=True).memory_state  # a piece that ends mid-chunk
        out = model(ids[:, 3:], labels=ids[:, 3:], memory_state=prefix)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        mixer = model.model.layers[0].mixer
        runs.append((out.loss.detach(), grads, getattr(mixer, "checkpoint_tokens", 0)))
    (loss0, grads0, _), rest = runs[0], runs[1:]
    spans = [span for *_, span in rest]  # tokens per piece (0 for TTT: it recomputes inside its own scan)
    assert (spans[1] == 3 * spans[0] > 0) if LAYERS[name].chunk_options else spans == [0, 0]
    for loss, grads, _ in rest:
        assert (loss - loss0).abs() <= 1e-12
        assert grads.keys() == grads0.keys()
        for k in grads0:  # the state crosses a piece boundary in float32 (as it crosses ranks under CP)
            assert (grads[k] - grads0[k]).abs().max() <= 1e-6 * (1 + grads0[k].abs().max()), k


def test_chunk_sizes_and_split_chunks():
    from models.common.scan import chunk_sizes, split_chunks

    assert chunk_sizes(0, 10, 4) == [4, 4, 2] and chunk_sizes(3, 10, 4) == [1, 4, 4, 1]
    assert chunk_sizes(8, 8, 4) == [4, 4] and chunk_sizes(5, 0, 4) == []
    x = torch.arange(20.0, requires_grad=True).view(1, 1, 10, 2)
    pieces = split_chunks([1, 4, 4, 1], x, {"g": x[..., 0]})
    assert len(pieces) == 4 and torch.equal(torch.cat([p[0] for p in pieces], 2), x)
    assert torch.equal(pieces[1][1]["g"], x[:, :, 1:5, 0])


@pytest.mark.parametrize("name", NAMES)
def test_declared_fast_weights_and_flops(name):
    spec = LAYERS[name]
    model = tiny(name)
    holders = [m for m in model.modules() if hasattr(m, "fast_weight_names")]
    assert bool(holders) == (spec.fast_weights == "fast_weight_names"), holders
    assert spec.flops(model.config, 2048) > 0


@pytest.mark.parametrize("name", [n for n in NAMES if LAYERS[n].options])
def test_layer_options_are_config_fields(name, tmp_path):
    options = LAYERS[name].options
    cfg = preset_config("test", memory_layer=name, **{k: v for k, v in LAYERS[name].test_config.items()})
    for key in options:
        assert key in cfg.to_dict()
    cfg.save_pretrained(tmp_path)
    assert all(getattr(MemoryLMConfig.from_pretrained(tmp_path), k) == getattr(cfg, k) for k in options)
    assert all(getattr(MemoryLMConfig(), k) == v for k, v in options.items())  # the registered defaults


def test_unknown_layer_type_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown memory_layer 'nope'"):
        MemoryLMConfig(memory_layer="nope")
