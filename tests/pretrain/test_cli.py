"""The trainer's command line: DeepSpeed's launcher idiom, --help, the sweep's help."""
import json
import re

import pytest

from pretrain.config import ConfigError, build_parser, parse_config


def test_deepspeed_launcher_idiom_reads_the_stage_from_the_json(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = parse_config(["--deepspeed", "--deepspeed_config", str(ds)])
    assert (cfg.deepspeed_config, cfg.zero_stage) == (str(ds), 3)
    assert parse_config(["--deepspeed-config", str(ds), "--zero-stage", "3"]).zero_stage == 3
    ds.write_text(json.dumps({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                              "gradient_accumulation_steps": 2}))  # no zero_optimization: stage 0, as in DeepSpeed
    cfg = parse_config(["--deepspeed_config", str(ds)])
    assert (cfg.zero_stage, cfg.global_batch_size, cfg.micro_batch, cfg.grad_accum) == (0, 32, 4, 1)  # accum derived
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}))
    cfg = parse_config(["--deepspeed_config", str(ds)])
    assert (cfg.global_batch_size, cfg.micro_batch, cfg.grad_accum) == (0, 4, 2)


@pytest.mark.parametrize("content,flags,message", [
    ({"zero_optimization": {"stage": 3}}, ["--zero-stage", "1"], "zero_optimization.stage = 3 but --zero-stage is 1"),
    ({"train_batch_size": 32}, ["--global-batch-size", "16"], "train_batch_size = 32 but --global-batch-size is 16"),
    ({"zero_optimization": {"stage": 7}}, [], "zero_optimization.stage = 7 is not valid: it must be 0, 1, 2 or 3"),
    ("{not json", [], "is not valid JSON"),
], ids=["contradiction", "batch-contradiction", "bad-stage", "malformed"])
def test_deepspeed_config_errors(tmp_path, content, flags, message):
    ds = tmp_path / "ds.json"
    ds.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        parse_config(["--deepspeed_config", str(ds), *flags])


def test_help_shows_each_default_once():
    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text
    assert len(re.findall(r"\(default: 'tiny'\)", text)) == 1
    for action in build_parser()._actions:
        if action.help and action.help != "==SUPPRESS==":
            assert action.help.count("(default:") <= 1, action.option_strings


def test_every_sweep_flag_has_help():
    """Every option of every subcommand of ``python -m pretrain.sweep`` (its parser, caught at parse time)."""
    import argparse

    import pretrain.sweep.__main__ as sweep

    seen = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        seen.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            sweep.main(["plan"])
    finally:
        argparse.ArgumentParser.parse_args = original
    subparsers = [a for a in seen[0]._actions if isinstance(a, argparse._SubParsersAction)][0]
    undocumented = [f"{name} {opt.option_strings[0]}" for name, sub in subparsers.choices.items()
                    for opt in sub._actions if opt.option_strings and opt.dest != "help" and not opt.help]
    assert undocumented == []
