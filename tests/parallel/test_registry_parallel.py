"""Every registered layer type (models/layers/registry.py) at its registered test sizes: TP=2 (its TP plan)
and CP=2 (its CP strategy, ``cp_mode="pass"``) each equal the single-process model — logits, loss and
every parameter's gradient (float32 ≤ 1e-5; float64 ≤ 1e-10 for the layers checked in float64) — and
the full state dict gathers and loads back under TP=2. One 2-process gloo job per layer type, so
``-k <name>`` runs one layer."""
import pytest

from models.layers.registry import LAYERS
from parallel.launch import run_distributed
from tests.parallel import workers

LAYOUTS = [(2, 1), (1, 2)]
SEQ = 42  # CP pieces of 21: every chunk size ≥ 2 of the test sizes is cut inside a chunk


def registry_worker(name):
    from parallel import init_parallel

    out = {"equivalence": workers.equivalence_worker(LAYOUTS, [(name, "pass", SEQ)])}
    out["state_dict"] = workers._state_dict_check(name, init_parallel(tp=2, cp=1))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYERS))
def test_tp2_and_cp2_equal_single_process(name):
    results = run_distributed(registry_worker, 2, args=(name,), timeout=600)
    for rank, res in enumerate(results):
        for tp, cp in LAYOUTS:
            r = res["equivalence"][(tp, cp, name, "pass", SEQ)]
            tol = 1e-5 if r["dtype"] == "torch.float32" else 1e-10
            assert not r["zero_grads"], f"reference grads are zero for {r['zero_grads']}: the test would be blind there"
            assert r["logits"] <= tol and r["loss"] <= tol and r["grad"] <= tol, (rank, tp, cp, r)
        sd = res["state_dict"]
        assert sd["shapes_ok"] and sd["max_diff"] == 0 and sd["round_trip"] == 0, sd


@pytest.mark.parametrize("name,group,expected", [
    ("titans", 2, ["TitansMemory"]), ("titans", 0, []), ("ttt_linear", 2, [])])
def test_scan_checkpointing_under_cp_is_reported(name, group, expected):
    """CP calls prepare / scan / output itself: the trainer warns which mixers' piece checkpointing it
    bypasses (TTT checkpoints inside its scan, which CP keeps)."""
    from models import MemoryLMForCausalLM, preset_config
    from parallel.context import CPPassMixer, scan_checkpointing_ignored, swap_class

    cfg = preset_config("test", memory_layer=name, scan_checkpoint_group_size=group, **LAYERS[name].test_config)
    model = MemoryLMForCausalLM(cfg)
    assert scan_checkpointing_ignored(model) == []  # not under CP
    for block in model.model.layers:
        swap_class(block.mixer, CPPassMixer)
    assert scan_checkpointing_ignored(model) == expected
