"""``make demo``: a small real pretraining run on the embedded default corpus, then export + generate.

    python -m pretrain.demo [--steps 300] [--out runs/demo]

1. pretrains the ``tiny`` preset (TTT-Linear, ~5M parameters) on the Python standard library's
   sources (``--data default``: prepared on first use, no download) on the CPU;
2. writes a self-contained Hugging Face folder (weights, config, tokenizer, model code);
3. reloads it with ``AutoModelForCausalLM``/``AutoTokenizer`` (``trust_remote_code=True``) and
   generates a continuation of a prompt.
Re-running continues the same run (it resumes from its last checkpoint).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """The run's latest checkpoint → a self-contained HF folder (pretrain.export, any layout)."""
    from pretrain.export import export

    export(run_dir, out_dir, overwrite=True)
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="run directory (the HF export goes to OUT/hf)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--prompt", default="def main(argv=None):\n    ")
    args = p.parse_args(argv)

    from pretrain import train

    print(f"== 1/3 pretraining the tiny preset on the embedded default corpus ({args.steps} steps, CPU)", flush=True)
    rc = train.main(["--model", "tiny", "--data", "default", "--out", args.out, "--steps", str(args.steps),
                     "--seq-len", "256", "--micro-batch", "8", "--lr", "2e-3", "--warmup", "30", "--zero-stage", "0",
                     "--precision", "fp32", "--save-every", "100", "--eval-every", "100", "--log-every", "20"])
    if rc != 0:
        return rc
    hf_dir = Path(args.out) / "hf"
    print(f"== 2/3 exporting to {hf_dir}", flush=True)
    export_run(Path(args.out), hf_dir)

    print("== 3/3 reloading with AutoModelForCausalLM (trust_remote_code) and generating", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)  # a stock tokenizer: no prompt
    ids = tok(args.prompt, return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=80, do_sample=True, top_k=20, temperature=0.8,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    print("-" * 60 + "\n" + tok.decode(out[0], skip_special_tokens=True) + "\n" + "-" * 60, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
