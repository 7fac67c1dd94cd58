"""Parity with the official ttt-lm-pytorch implementation over many configurations.

The official code is not part of this project. Point MEMTRAIN_OFFICIAL_TTT at its ``ttt.py``
to run these checks (e.g. a checkout of test-time-training/ttt-lm-pytorch); without it they
are skipped. The golden fixtures (test_convert_official.py) cover two configurations always.
"""
import importlib.util
import itertools
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.convert_official import build_model

OFFICIAL = os.environ.get("MEMTRAIN_OFFICIAL_TTT")
pytestmark = pytest.mark.skipif(not OFFICIAL, reason="set MEMTRAIN_OFFICIAL_TTT=/path/to/official/ttt.py")


@pytest.fixture(scope="module")
def official():
    spec = importlib.util.spec_from_file_location("official_ttt", OFFICIAL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import transformers
    if int(transformers.__version__.split(".")[0]) >= 5:  # the official code predates the dict form
        mod.TTTForCausalLM._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    return mod


GRID = [
    dict(ttt_layer_type=layer, pre_conv=pc, share_qk=sq, use_gate=g, mini_batch_size=mb, conv_kernel=ck)
    for layer, pc, sq, g, (mb, ck) in itertools.product(
        ["linear", "mlp"], [False, True], [False, True], [False, True], [(16, 4), (8, 2)])
]
LENGTHS = [1, 7, 16, 45]  # shorter than a mini-batch, exact multiple, and with a remainder


def official_and_ours(official, folder: Path, **cfg):
    """A perturbed official model (every term exercised) and our conversion of it."""
    torch.manual_seed(0)
    config = official.TTTConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=3, **cfg)
    ref = official.TTTForCausalLM(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"},
              folder / "model.safetensors")
    return ref, build_model(folder)


@pytest.mark.parametrize("cfg", GRID, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_logits_match_official(official, cfg, tmp_path: Path):
    ref, ours = official_and_ours(official, tmp_path, ttt_base_lr=0.7, rope_theta=500.0, **cfg)
    for T in LENGTHS:
        ids = torch.randint(0, 101, (2, T))
        with torch.no_grad():
            # return_dict=False: transformers 5 renames the official output field cache_params
            expected = ref(input_ids=ids, use_cache=False, return_dict=False)[0]
            got = ours(ids).logits
        assert (got - expected).abs().max() <= 1e-4, T


@pytest.mark.parametrize("layer", ["linear", "mlp"])
@pytest.mark.parametrize("extra", [{}, dict(pre_conv=True, share_qk=True, use_gate=True)], ids=["plain", "conv_qk_gate"])
def test_decoding_matches_official_cache(official, layer, extra, tmp_path: Path):
    """Prefill + token-by-token decoding with our state = the official TTTCache decode."""
    ref, ours = official_and_ours(official, tmp_path, mini_batch_size=8, ttt_layer_type=layer, use_cache=True, **extra)
    ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        cache = official.TTTCache(ref.model, 2)  # the official prefill must end on a mini-batch boundary
        ref_h = ref.model(input_ids=ids[:, :16], cache_params=cache, use_cache=True, return_dict=False)[0]
        out = ours(ids[:, :16], use_cache=True)
        errs = [(ref.lm_head(ref_h) - out.logits).abs().max()]
        state = out.memory_state
        for t in range(16, 30):
            ref_h = ref.model(input_ids=ids[:, t:t + 1], cache_params=cache, use_cache=True, return_dict=False)[0]
            out = ours(ids[:, t:t + 1], memory_state=state, use_cache=True)
            state = out.memory_state
            errs.append((ref.lm_head(ref_h) - out.logits).abs().max())
    assert max(errs) <= 1e-4
