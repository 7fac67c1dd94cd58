"""Converter from official ttt-lm-pytorch checkpoints: golden logits, self-contained folders, bad input."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import models  # noqa: F401  (registers the Auto classes)
from models.convert_official import main as convert_main

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter where the project's packages cannot be imported: only torch and
# transformers (and their dependencies) are available, as for a user who just downloaded DST.
STANDALONE = textwrap.dedent(
    """
    import sys, importlib.abc
    BLOCKED = {"models", "parallel", "pretrain", "data_pipeline", "bench"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"project package {name} must not be needed")
    sys.meta_path.insert(0, Block())
    sys.path = [p for p in sys.path if p not in ("", ".") and p.rstrip("/") != REPO_PATH]
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    dst, io_path = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    io = load_file(io_path)
    with torch.no_grad():
        out = model(io["input_ids"], labels=io["input_ids"])
    print((out.logits - io["logits"]).abs().max().item(), (out.loss - io["loss"]).abs().item())
    """
)


def convert(src, dst, *extra):
    return convert_main([str(src), str(dst), *extra])


def test_golden_logits_through_installed_package(golden_dirs, tmp_path):
    for src in golden_dirs:
        dst = tmp_path / src.name
        assert convert(src, dst) == 0
        model = AutoModelForCausalLM.from_pretrained(dst).eval()
        io = load_file(src / "io.safetensors")
        with torch.no_grad():
            out = model(io["input_ids"], labels=io["input_ids"])
        assert (out.logits - io["logits"]).abs().max().item() <= 1e-4, src.name
        assert abs(out.loss.item() - io["loss"].item()) <= 1e-5, src.name


def test_golden_logits_standalone_remote_code(golden_dirs, tmp_path):
    """DST alone (model code inside) reproduces the official logits without this project."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    for src in golden_dirs:
        dst = tmp_path / "out" / src.name
        assert convert(src, dst) == 0
        res = subprocess.run(
            [sys.executable, "-c", STANDALONE.replace("REPO_PATH", repr(str(REPO))), str(dst), str(src / "io.safetensors")],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        logit_err, loss_err = map(float, res.stdout.split()[-2:])
        assert logit_err <= 1e-4 and loss_err <= 1e-5, (src.name, logit_err, loss_err)


def test_pytorch_bin_and_untied_head(golden_dirs, tmp_path):
    src = tmp_path / "bin_src"
    src.mkdir()
    golden = golden_dirs[0]
    weights = load_file(golden / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    torch.save(weights, src / "pytorch_model.bin")
    shutil.copy(golden / "config.json", src / "config.json")
    assert convert(src, tmp_path / "dst") == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    io = load_file(golden / "io.safetensors")
    with torch.no_grad():
        assert (model(io["input_ids"]).logits - io["logits"]).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------ bad input


def _copy_golden(golden, dst):
    shutil.copytree(golden, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def existing_dst(tmp_path):
    dst = tmp_path / "existing"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    return dst


def run_cli(*args):
    """The real command line, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "models.convert_official", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.fixture
def run_main(capsys):
    """The same entry point in-process (fast): returns (exit code, stdout, stderr)."""
    def run(*args):
        capsys.readouterr()  # drop what earlier steps printed
        rc = convert_main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)
    return run


def test_missing_tensor_is_one_clear_error(golden_dirs, tmp_path, existing_dst):
    src = _copy_golden(golden_dirs[0], tmp_path / "src")
    w = load_file(src / "model.safetensors")
    w.pop("model.layers.1.seq_modeling_block.W1")
    save_file(w, src / "model.safetensors")
    before = _snapshot(existing_dst)
    res = run_cli(src, existing_dst, "--overwrite")
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and "missing model.layers.1.mixer.W1" in res.stderr
    assert "Traceback" not in res.stderr
    assert _snapshot(existing_dst) == before


def test_unexpected_tensor_is_an_error(golden_dirs, tmp_path, run_main):
    src = _copy_golden(golden_dirs[0], tmp_path / "src")
    w = load_file(src / "model.safetensors")
    w["model.layers.0.seq_modeling_block.mystery"] = torch.zeros(3)
    save_file(w, src / "model.safetensors")
    res = run_main(src, tmp_path / "dst")
    assert res.returncode == 2 and "unexpected tensors" in res.stderr
    assert not (tmp_path / "dst").exists()


def test_shape_mismatch_is_an_error(golden_dirs, tmp_path, run_main):
    src = _copy_golden(golden_dirs[0], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (src / "config.json").write_text(json.dumps(cfg))
    res = run_main(src, tmp_path / "dst")
    assert res.returncode == 2 and "shape mismatch" in res.stderr


@pytest.mark.parametrize("case", ["empty", "not_ttt", "ours", "bad_json", "bad_layer", "bad_heads", "corrupt"])
def test_non_official_folder_is_rejected(golden_dirs, tmp_path, case, run_main):
    src = tmp_path / "src"
    if case == "empty":
        src.mkdir()
    elif case == "ours":
        assert convert(golden_dirs[0], src) == 0
    else:
        _copy_golden(golden_dirs[0], src)
        cfg = json.loads((src / "config.json").read_text())
        if case == "not_ttt":
            (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
        elif case == "bad_json":
            (src / "config.json").write_text("{not json")
        elif case == "bad_layer":
            (src / "config.json").write_text(json.dumps({**cfg, "ttt_layer_type": "transformer"}))
        elif case == "bad_heads":
            (src / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 5}))
        elif case == "corrupt":
            data = (src / "model.safetensors").read_bytes()
            (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    res = run_main(src, tmp_path / "dst")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "dst").exists()


def test_existing_destination_needs_overwrite(golden_dirs, existing_dst, run_main):
    before = _snapshot(existing_dst)
    res = run_main(golden_dirs[0], existing_dst)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert _snapshot(existing_dst) == before
    res = run_main(golden_dirs[0], existing_dst, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert (existing_dst / "config.json").is_file() and not (existing_dst / "keep.txt").exists()
    assert not [p for p in existing_dst.parent.iterdir() if p.name.startswith(".existing")]  # no temp left


def test_cli_help():
    res = run_cli("--help")
    assert res.returncode == 0 and "official" in res.stdout
