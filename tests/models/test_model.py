"""HF model: configs, save/load, state passing through the whole model, cached generation."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import models
from models import MemoryLMConfig, MemoryLMForCausalLM, preset_config

CONFIGS = {
    "linear": dict(memory_layer="ttt_linear", mini_batch_size=8),
    "mlp_gate_conv_shareqk": dict(memory_layer="ttt_mlp", mini_batch_size=8, pre_conv=True, share_qk=True, use_gate=True),
    "gated_deltanet": dict(memory_layer="gated_deltanet", deltanet_chunk_size=8),
    "deltanet_swa_hybrid": dict(memory_layer="deltanet", layer_pattern="M,S", attention_window=6, deltanet_chunk_size=8),
    "attention_ttt_hybrid": dict(memory_layer="ttt_linear", layer_pattern=["attention", "memory"], mini_batch_size=8),
    "titans_mac": dict(memory_layer="titans_mac", titans_chunk_size=4, titans_segment_size=8, num_persistent_tokens=2),
    "lact_gdn_hybrid": dict(layer_pattern=["lact", "gated_deltanet"], lact_chunk_size=6, attention_window=4,
                            lact_num_heads=2, deltanet_chunk_size=4),
    "titans_mag_mal": dict(layer_pattern=["titans_mag", "titans_mal"], titans_chunk_size=4, attention_window=5),
}


def tiny_model(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = MemoryLMForCausalLM(preset_config("test", **CONFIGS[name])).to(dtype).eval()
    with torch.no_grad():  # random, non-trivial per-head parameters
        for n, p in model.named_parameters():
            if "token_idx_offset" in n or "ttt_norm" in n or "lr_gate.bias" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_model_one_call_equals_pieces(name):
    model = tiny_model(name, torch.float64)
    ids = torch.randint(0, 128, (2, 43))
    full = model(ids).logits
    state, parts = None, []
    for a, b in [(0, 5), (5, 19), (19, 20), (20, 43)]:
        out = model(ids[:, a:b], memory_state=state, use_cache=True)
        state = out.memory_state
        parts.append(out.logits)
    assert state.position == 43
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_with_state_equals_full_recompute(name):
    model = tiny_model(name)
    prompt = torch.randint(0, 128, (2, 11))
    fed = []
    hook = model.model.register_forward_pre_hook(lambda mod, args: fed.append(args[0].shape[1]))
    gen = model.generate(prompt, max_new_tokens=14, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    hook.remove()
    assert gen.sequences.shape == (2, 25)
    assert fed == [11] + [1] * 13  # prefill once, then one token per step through the state
    seq = prompt
    for step, step_logits in enumerate(gen.logits):
        with torch.no_grad():
            logits = model(seq).logits[:, -1]  # the whole prefix, no state
        assert (logits - step_logits).abs().max() <= 1e-4, step
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, gen.sequences)


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_model("mlp_gate_conv_shareqk")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MemoryLMForCausalLM)
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_auto_config_registration():
    cfg = AutoConfig.for_model("memory_lm", hidden_size=64, num_attention_heads=4)
    assert isinstance(cfg, MemoryLMConfig)


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_model("linear").train()
    ids = torch.randint(0, 128, (2, 24))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.model.gradient_checkpointing = ckpt
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_presets_match_official_sizes():
    # the official TTT_STANDARD_CONFIGS (ttt-lm-pytorch ttt.py)
    official = {"125m": (768, 2048, 12, 12), "350m": (1024, 2736, 24, 16),
                "760m": (1536, 4096, 24, 16), "1b": (2048, 5504, 24, 32)}
    for name, (h, i, l, a) in official.items():
        cfg = preset_config(name)
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (h, i, l, a)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in MemoryLMForCausalLM(preset_config("125m")).parameters())
    assert 100e6 < n_params < 160e6


@pytest.mark.parametrize("kwargs,match", [
    (dict(memory_layer="lstm"), "unknown memory_layer"),
    (dict(hidden_size=64, num_attention_heads=5), "not divisible"),
    (dict(mini_batch_size=0), "mini_batch_size"),
    (dict(scan_impl="triton-please"), "scan_impl"),
])
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryLMConfig(**kwargs)


def test_package_exports():
    assert models.MemoryLMForCausalLM is MemoryLMForCausalLM
