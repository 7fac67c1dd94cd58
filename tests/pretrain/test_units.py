"""Fast, single-process pieces of the training program: configuration, optimizer groups and
schedules, and checkpoint atomicity (with a stand-in engine; the real one is in test_train.py)."""
import json
import math
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint
from pretrain.config import CONFIG_DIR, ConfigError, TrainConfig, build_parser, load_config_file, parse_config
from pretrain.optim import LRSchedule, build_scheduler, decay_parameter_names, param_groups, set_schedule


# ------------------------------------------------------------------------------- configuration
def test_flags_are_the_issue_names():
    help_text = build_parser().format_help()
    for flag in ("--config", "--model", "--data", "--out", "--steps", "--seq-len", "--micro-batch", "--grad-accum",
                 "--tp", "--cp", "--zero-stage", "--precision", "--lr", "--schedule", "--warmup", "--save-every",
                 "--seed"):
        assert flag in help_text, flag


def test_file_then_flags_override(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: test\nsteps: 7\nlr: 1.0e-3\nactivation_checkpointing: true\nseq-len: 128\n")
    cfg = parse_config(["--config", str(f), "--steps", "9"])
    assert (cfg.model, cfg.steps, cfg.lr, cfg.activation_checkpointing, cfg.seq_len) == ("test", 9, 1e-3, True, 128)
    assert cfg.micro_batch == TrainConfig().micro_batch  # untouched default
    assert parse_config(["--config", str(f), "--no-activation-checkpointing"]).activation_checkpointing is False


@pytest.mark.parametrize("text,message", [
    ("stepz: 3\n", "unknown setting"),
    ("steps: three\n", "must be int"),
    ("- a\n- b\n", "mapping"),
    ("steps: [\n", "cannot parse"),
])
def test_bad_config_files(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", str(f)])


def test_shipped_run_configs_parse():
    files = sorted((CONFIG_DIR / "runs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = TrainConfig(**load_config_file(f))
        cfg.validate()


def test_shipped_deepspeed_configs():
    from pretrain.train import deepspeed_config

    for stage in range(4):
        for offload in (False, True):
            ds = deepspeed_config(TrainConfig(zero_stage=stage, offload=offload, micro_batch=3, grad_accum=2))
            assert ds["zero_optimization"]["stage"] == stage
            assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
            assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # fp32 master weights always
            assert ("offload_optimizer" in ds["zero_optimization"]) == (offload and stage > 0)


# ---------------------------------------------------------------------------------- optimizer
def test_weight_decay_groups():
    import models

    model = models.MemoryLMForCausalLM(models.preset_config("test", pre_conv=True))
    decay, no_decay = decay_parameter_names(model)
    assert set(decay).isdisjoint(no_decay)
    assert len(decay) + len(no_decay) == len({id(p) for p in model.parameters()})  # tied head counted once
    for name in decay:
        assert name.endswith("weight") and "norm" not in name and "embed" not in name, name
    for must in ("q_proj.weight", "o_proj.weight", "lr_gate.weight", "mlp.down_proj.weight", "conv.weight"):
        assert any(n.endswith(must) for n in decay), must
    for must in ("embed_tokens.weight", "mixer.W1", "mixer.b1", "token_idx_offset", "ttt_norm_weight",
                 "mixer_norm.weight", "post_norm.bias", "lr_gate.bias"):
        assert any(n.endswith(must) for n in no_decay), must
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_memory_layers_own_parameters_are_not_decayed():
    """Every memory layer (a module declaring ``fast_weight_names``) keeps all its direct parameters
    (θ₀ and the per-head gates/scales/norms beside it) out of weight decay, every family alike; its
    projections (nn.Linear) and convolutions are decayed."""
    from torch import nn

    from tests.models.test_families_model import all_types_model

    model = all_types_model()
    decay, no_decay = map(set, decay_parameter_names(model))
    kinds = set()
    for name, module in model.named_modules():
        if hasattr(module, "fast_weight_names"):
            kinds.add(type(module).__name__)
            assert set(module.fast_weight_names) <= dict(module.named_parameters(recurse=False)).keys(), name
            for p in module.named_parameters(recurse=False):
                assert f"{name}.{p[0]}" in no_decay, f"{name}.{p[0]}"
        elif isinstance(module, nn.Linear) and name.startswith("model.layers."):  # (lm_head: tied to the embedding)
            assert f"{name}.weight" in decay, name
    assert {"TTTLayer", "TitansMemory", "LaCTLayer", "MirasLayer", "AtlasLayer", "TNTLayer", "HopeLayer"} <= kinds


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_schedules(kind):
    s = LRSchedule(kind, total=100, warmup=10, min_ratio=0.1, decay_fraction=0.2)
    assert 0 < s(0) < s(5) < s(9) < 1 and s(10) == pytest.approx(1.0)
    assert s(100) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)
    values = [s(i) for i in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))  # never rises after warmup
    if kind == "wsd":
        assert s(79) == 1.0 and s(90) == pytest.approx(0.55)
    else:
        assert s(55) == pytest.approx(0.55)


def test_resumed_scheduler_follows_the_new_total():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, LRSchedule("cosine", 100, 0))
    for _ in range(50):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([p], lr=1.0)
    sched2 = build_scheduler(opt2, LRSchedule("cosine", 200, 0))
    sched2.load_state_dict(state)  # brings the old schedule (total=100) back ...
    set_schedule(sched2, LRSchedule("cosine", 200, 0), 1.0, (0.9, 0.999), 1e-8, 0.0)  # ... which the trainer replaces
    opt2.step()
    sched2.step()
    assert sched2.get_last_lr()[0] == pytest.approx(LRSchedule("cosine", 200, 0)(51))


def test_resume_applies_the_settings_learning_rate_bitwise():
    """set_schedule recomputes the current rate as LambdaLR does: bitwise the same with the old
    settings, and a new peak rate (--allow-change lr) takes effect from the next step."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": 0.1, "name": "decay"}], lr=3e-3)
    schedule = LRSchedule("cosine", 100, 10)
    sched = build_scheduler(opt, schedule)
    for _ in range(37):
        opt.step()
        sched.step()
    before = sched.get_last_lr()[0]
    set_schedule(sched, schedule, 3e-3, (0.9, 0.999), 1e-8, 0.1)
    assert sched.get_last_lr()[0] == before == opt.param_groups[0]["lr"]
    set_schedule(sched, schedule, 6e-3, (0.8, 0.99), 1e-6, 0.01)
    assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0] == 6e-3 * schedule(37)
    assert (opt.param_groups[0]["betas"], opt.param_groups[0]["eps"], opt.param_groups[0]["weight_decay"]) == \
        ((0.8, 0.99), 1e-6, 0.01)
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == 6e-3 * schedule(38)


# --------------------------------------------------------------------------------- checkpoints
class FakeEngine:
    """Writes one file the way DeepSpeed's save_checkpoint lays it out."""

    def __init__(self, payload=b"weights"):
        self.payload = payload

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(self.payload + str(client_state["step"]).encode())


def _save(run, step, **kw):
    return checkpoint.save(FakeEngine(), run, step, {"step": step, "tokens": 0, "data": {}}, **kw)


def test_save_publishes_atomically_and_prunes(tmp_path):
    for step in (5, 10, 15):
        _save(tmp_path, step, keep=2)
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000015"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000010", "step_00000015"]
    folder, manifest = checkpoint.find_resume(tmp_path)
    assert folder.name == "step_00000015" and manifest["step"] == 15
    assert set(manifest["files"]) == {"mp_rank_00_model_states.pt", "trainer_state.json", "rng_rank00000.safetensors"}
    checkpoint.verify_crcs(folder, manifest)


def test_crash_before_publishing_leaves_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 5)

    def crash():
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 10, before_publish=crash)
    ck = tmp_path / "checkpoints"
    assert (ck / ".tmp-step_00000010").is_dir()  # the partial save is there, under a name never loaded
    folder, _ = checkpoint.find_resume(tmp_path)
    assert folder.name == "step_00000005"
    _save(tmp_path, 10)  # the next save clears the leftovers
    assert not (ck / ".tmp-step_00000010").exists()
    assert checkpoint.find_resume(tmp_path)[0].name == "step_00000010"


def test_no_checkpoint_means_a_new_run(tmp_path):
    assert checkpoint.find_resume(tmp_path) is None
    (tmp_path / "checkpoints" / ".tmp-step_00000003" / "step_00000003").mkdir(parents=True)
    assert checkpoint.find_resume(tmp_path) is None  # a partial save is never resumed from


@pytest.mark.parametrize("damage,message", [
    ("truncate", "corrupt"), ("flip", "checksum"), ("no_manifest", "partial"), ("missing_file", "missing"),
    ("latest_garbage", "corrupt"), ("latest_dangling", "does not exist"),
])
def test_damaged_checkpoints_are_refused(tmp_path, damage, message):
    _save(tmp_path, 5)
    ck = tmp_path / "checkpoints"
    folder = ck / "step_00000005"
    weights = folder / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-1])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[0] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (folder / "manifest.json").unlink()
    elif damage == "missing_file":
        weights.unlink()
    elif damage == "latest_garbage":
        (ck / "latest").write_text("../../etc\n")
    else:
        (ck / "latest").write_text("step_00000099\n")
    with pytest.raises(checkpoint.CheckpointError, match=message):
        folder, manifest = checkpoint.find_resume(tmp_path)
        checkpoint.verify_crcs(folder, manifest)


def test_rng_state_round_trip(tmp_path):
    """Through a safetensors file, as a checkpoint stores it (normal and Gaussian-cached states)."""
    import random

    import numpy as np

    from pretrain.safe_files import load_tree, rng_tree, save_tree, set_rng_tree

    random.gauss(0, 1), np.random.randn()  # both keep a cached Gaussian in their state
    save_tree(rng_tree(), tmp_path / "rng.safetensors")
    a = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(1).item())
    set_rng_tree(load_tree(tmp_path / "rng.safetensors"))
    assert (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(1).item()) == a
    assert math.isfinite(a[0]) and json.dumps({"ok": True})
