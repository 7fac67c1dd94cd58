"""Shared fixtures. Keep torch single-threaded-per-test deterministic and fast on 2 cores."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def golden_dirs():
    dirs = sorted(p for p in GOLDEN.iterdir() if (p / "io.safetensors").is_file())
    assert dirs, f"no golden fixtures under {GOLDEN}"
    return dirs
