"""Tokenizer: lossless round trip, deterministic training, Hugging Face export."""
import pytest

from data_pipeline.tokenizer import EOS_ID, PAD_ID, Tokenizer, to_hf_tokenizer, train_tokenizer

from .conftest import make_docs

TRICKY = [
    "def f(x):\n    return x  # trailing spaces  \n\n\tTabbed\r\n",
    "  leading and trailing  ",
    "unicode: état 記憶 🙂 and never-seen Ω≈ç√∫ ℵ",
    "",
    "\n\n\n",
    "digits 1234567890 and 3.14159",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return Tokenizer(train_tokenizer(make_docs(200, 0), out / "tok", vocab_size=500))


def test_round_trip_is_lossless(tokenizer):
    for text in TRICKY + make_docs(20, 9):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_batch(TRICKY, num_threads=2) == [tokenizer.encode(t) for t in TRICKY]


def test_special_ids(tokenizer, tmp_path):
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id) == (EOS_ID, PAD_ID, 1)
    assert tokenizer.vocab_size == 500 and tokenizer.model_type == "bpe"
    assert EOS_ID not in tokenizer.encode("</s> <s> <pad>")  # control pieces are never produced from text
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.model_path.read_bytes())
    assert Tokenizer.load(tmp_path).sha256 == tokenizer.sha256


def test_training_is_deterministic(tmp_path, tokenizer):
    again = train_tokenizer(make_docs(200, 0), tmp_path / "again", vocab_size=500)
    assert again.read_bytes() == tokenizer.model_path.read_bytes()
    files = []
    for i, doc in enumerate(make_docs(200, 0)):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(doc, encoding="utf-8")
    assert train_tokenizer(files, tmp_path / "from_files", vocab_size=500).read_bytes() == again.read_bytes()
    other = train_tokenizer(make_docs(200, 1), tmp_path / "other", vocab_size=500)
    assert other.read_bytes() != again.read_bytes()


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_hf_export_loads_with_auto_tokenizer(model_type, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = tokenizer if model_type == "bpe" else Tokenizer(
        train_tokenizer(make_docs(200, 0), tmp_path / "uni", vocab_size=320, model_type="unigram"))
    hf = AutoTokenizer.from_pretrained(to_hf_tokenizer(tok.model_path, tmp_path / "hf"))
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id and len(hf) == tok.vocab_size
    for text in TRICKY + make_docs(30, 3):
        ids = tok.encode(text)
        assert hf.decode(ids) == text
        if model_type == "bpe":  # BPE converts exactly; unigram may segment differently but decodes the same
            assert hf(text, add_special_tokens=False)["input_ids"] == ids == hf(text)["input_ids"]  # no BOS/EOS added


_LOAD = r"""
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)
texts = json.loads(sys.argv[2])
print(json.dumps({"class": type(tok).__module__ + "." + type(tok).__name__, "padding_side": tok.padding_side,
                  "ids": [tok(t)["input_ids"] for t in texts],
                  "custom": sorted(m for m in sys.modules if m.startswith("transformers_modules"))}))
"""


def test_exported_folder_tokenizer_loads_without_remote_code(tokenizer, tmp_path):
    """An exported model folder (config.json with the model code's auto_map beside the tokenizer):
    in a fresh process, AutoTokenizer loads a stock transformers tokenizer with trust_remote_code=False,
    asks nothing, runs none of the folder's code, pads on the left and encodes like `Tokenizer`."""
    import json
    import os
    import subprocess
    import sys

    from models import MemoryLMForCausalLM, preset_config
    from models.hf_folder import save_model_folder

    folder = tmp_path / "exported"
    save_model_folder(MemoryLMForCausalLM(preset_config("test", vocab_size=tokenizer.vocab_size)), folder)
    to_hf_tokenizer(tokenizer.model_path, folder)
    texts = TRICKY + ["Grüße, 東京 — ∑x² ≠ 🙂🙃"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    res = subprocess.run([sys.executable, "-c", _LOAD, str(folder), json.dumps(texts)], cwd=tmp_path, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "custom code" not in res.stdout + res.stderr, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["class"].startswith("transformers.") and not got["custom"], got
    assert got["padding_side"] == "left"
    assert got["ids"] == [tokenizer.encode(t) for t in texts]
    assert not (tmp_path / "hf_modules").exists() or not any((tmp_path / "hf_modules").rglob("*.py"))
