"""python -m pretrain.export: ZeRO/TP/CP checkpoints → a self-contained HF folder, logits-equal.

How "the training model's logits" are obtained (the honest option): after a 5-step run under
each layout, ``_training_logits.py`` is launched with the same number of processes, rebuilds the
model exactly as the trainer does (parallelize + deepspeed.initialize under the run's ZeRO
stage), restores the checkpoint through the trainer's own resume path (pretrain.checkpoint.load),
runs fixed inputs through the sharded engine and gathers the logits over TP (vocabulary) and CP
(sequence). The exported folder, loaded single-device, must give the same logits ≤1e-5. This
compares against the very weights the distributed run holds, not against a single-process run
that is only known to agree in loss.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.pretrain.test_train import REPO, env, free_port, run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _training_logits import fixed_inputs  # noqa: E402

from pretrain import export  # noqa: E402

HELPER = Path(__file__).resolve().parent / "_training_logits.py"
TORCH, TRANSFORMERS = "2.13.0", "5.24.0"  # constraints.txt


def _export(src, out, *args):
    """Runs the CLI in-process; returns its exit code."""
    try:
        return export.main([str(src), str(out), *map(str, args)])
    except SystemExit as exc:  # argparse
        return exc.code


def _logits(folder):
    from models import MemoryLMForCausalLM

    model = MemoryLMForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(fixed_inputs(model.config.vocab_size)).logits.float()


# ------------------------------------------------------------------- every parallel layout
@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ("--zero-stage", 1, "--micro-batch", 2), ("--zero-stage", 2, "--micro-batch", 2),
    ("--zero-stage", 3, "--micro-batch", 2), ("--tp", 2, "--micro-batch", 4), ("--cp", 2, "--micro-batch", 4),
], ids=["zero1", "zero2", "zero3", "tp2", "cp2"])
def test_export_logits_equal_the_training_model(tmp_path, layout):
    run_dir = tmp_path / "run"
    res = run(run_dir, "--steps", 5, *layout, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    ref_file = tmp_path / "training_logits.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(HELPER), str(run_dir), str(ref_file)]
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "hf"
    assert _export(run_dir, out) == 0
    want, got = torch.load(ref_file), _logits(out)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


# ------------------------------------------------------------------ single-process run, default data
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """2 steps on the embedded default corpus (it has a tokenizer), single process."""
    out = tmp_path_factory.mktemp("default") / "run"
    res = run(out, "--steps", 2, "--micro-batch", 2, "--zero-stage", 0, "--data", "default")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def exported(small_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    assert _export(small_run, base / "fp32", "--max-shard-size", "100KB") == 0
    assert _export(small_run, base / "bf16", "--dtype", "bfloat16") == 0
    return base


def test_folder_contents(exported, small_run):
    fp32 = exported / "fp32"
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "modeling_memory.py",
                 "configuration_memory.py", "tokenizer_config.json"):
        assert (fp32 / name).is_file(), name
    assert len(list(fp32.glob("model-*.safetensors"))) > 1  # sharded past --max-shard-size
    assert json.loads((fp32 / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    assert (exported / "bf16" / "model.safetensors").is_file()
    assert not [p for p in exported.iterdir() if p.name.startswith(".")]  # no temporary folders left
    # the single-process checkpoint's own module states → identical logits
    from models import MemoryLMConfig, MemoryLMForCausalLM

    folder = small_run / "checkpoints" / (small_run / "checkpoints" / "latest").read_text().strip()
    model = MemoryLMForCausalLM(MemoryLMConfig.from_json_file(small_run / "model_config.json"))
    model.load_state_dict(torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)["module"])
    with torch.no_grad():
        want = model.eval()(fixed_inputs(model.config.vocab_size)).logits
    assert torch.equal(_logits(fp32), want)
    bf16 = (_logits(exported / "bf16") - want).abs().max().item()
    assert 0 < bf16 < 0.1 * want.abs().max().item()


def test_step_and_checkpoint_folder(small_run, tmp_path):
    assert _export(small_run, tmp_path / "a", "--step", 2) == 0
    assert _export(small_run / "checkpoints" / "step_00000002", tmp_path / "b") == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


_STANDALONE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    ids = tok("def main(argv=None):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 8, out.shape
    print(folder.rsplit('/', 1)[-1], next(model.parameters()).dtype, repr(tok.decode(out[0])))
import importlib.util
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("pretrain") is None
print("ok")
"""


@pytest.fixture(scope="module")
def bare_venv():
    """A venv with only torch and transformers, built once and reused (~/.cache/memtrain/test-venvs)."""
    root = Path(os.environ.get("MEMTRAIN_TEST_VENVS", Path.home() / ".cache" / "memtrain" / "test-venvs"))
    venv = root / f"torch-{TORCH}_transformers-{TRANSFORMERS}"
    if not (venv / "bin" / "python").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["python3", "-m", "venv", str(tmp)], check=True)
        subprocess.run([str(tmp / "bin" / "pip"), "install", "-q", f"torch=={TORCH}", f"transformers=={TRANSFORMERS}"],
                       check=True, timeout=1200)
        os.replace(tmp, venv)
    return venv / "bin" / "python"


@pytest.mark.slow
def test_loads_and_generates_in_a_bare_venv(bare_venv, exported, tmp_path):
    """fp32 and bf16 exports: AutoModelForCausalLM (trust_remote_code) + AutoTokenizer + generate,
    in a virtualenv with only torch and transformers, run outside the repository."""
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([str(bare_venv), "-c", _STANDALONE, str(exported / "fp32"), str(exported / "bf16")],
                         cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "bfloat16" in res.stdout and res.stdout.strip().endswith("ok"), res.stdout


def test_training_starts_from_an_exported_folder(exported, tmp_path):
    """The reverse direction: --model OUT_DIR continues pretraining from the exported weights."""
    res = run(tmp_path / "cont", "--model", exported / "fp32", "--data", "default", "--steps", 1, "--micro-batch", 2,
              "--zero-stage", 0)
    assert res.returncode == 0, res.stderr[-3000:]


# ---------------------------------------------------------------------------------- bad input
def _error(capsys, *args):
    code = _export(*args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        export.main(["--help"])
    assert exc.value.code == 0 and "--max-shard-size" in capsys.readouterr().out


def test_no_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no checkpoint" in _error(capsys, tmp_path / "empty", tmp_path / "out")
    assert "does not exist" in _error(capsys, tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint(small_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    next((copy / "checkpoints" / "step_00000002").glob("mp_rank_*")).unlink()
    assert "partial" in _error(capsys, copy, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_corrupt_checkpoint(small_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    victim = next((copy / "checkpoints" / "step_00000002").glob("mp_rank_*"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert "checksum" in _error(capsys, copy, tmp_path / "out")


def test_tp_size_mismatch(small_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "tp": 2}))
    assert "TP size mismatch" in _error(capsys, copy, tmp_path / "out")


def test_non_empty_out_dir_needs_overwrite(small_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in _error(capsys, small_run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _export(small_run, out, "--overwrite") == 0
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert "--dtype" in _error(capsys, small_run, tmp_path / "x", "--dtype", "float16")
