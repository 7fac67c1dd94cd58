"""The FLOP model behind MFU."""
import pytest

from models import preset_config
from models.hf.configuration_memory import MEMORY_LAYERS
from pretrain.metrics import flops_per_token


def test_ttt_linear_matches_the_hand_count():
    cfg = preset_config("125m", vocab_size=32000)
    C, H, I, L, V, b = 768, 12, 2048, 12, 32000, 16
    d = C // H
    dense = L * (4 * C * C + C * H + 3 * C * I)  # q, k, v, o, lr gate, SwiGLU
    scan = L * H * (6 * d * d + 4 * b * d)
    expected = 3 * (2 * dense + scan + 2 * C * V)
    assert flops_per_token(cfg, 2048)["total"] == expected


@pytest.mark.parametrize("kind", sorted(MEMORY_LAYERS))
def test_every_memory_layer_has_a_flop_model(kind):
    out = flops_per_token(preset_config("test", memory_layer=kind), 256)
    assert out["sequence_mixing"] > 0 and out["total"] == sum(v for k, v in out.items() if k != "total")


def test_attention_cost_grows_with_context_only_up_to_the_window():
    full = [flops_per_token(preset_config("test", layer_pattern="attention", attention_window=64), T)["total"]
            for T in (128, 1024)]
    swa = [flops_per_token(preset_config("test", layer_pattern="swa", attention_window=64), T)["total"]
           for T in (1024, 8192)]
    assert full[1] > full[0]
    assert swa[1] >= swa[0] and swa[1] - swa[0] < 0.01 * swa[0]
