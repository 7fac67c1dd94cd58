"""parallel/trace.py: the Chrome-trace format, the spans it records, and that tracing changes
nothing (outputs and gradients bit-equal, the model restored on detach)."""
from __future__ import annotations

import json

import pytest
import torch

from parallel.trace import attach_tracer, detach_tracer, load_events, merge_traces


def _model(layer: str):
    from models import MemoryLMForCausalLM, preset_config

    torch.manual_seed(0)
    return MemoryLMForCausalLM(preset_config("test", memory_layer=layer, mini_batch_size=8))


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids, use_cache=False).logits
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layer", ["ttt_linear", "gated_deltanet"])
def test_trace_format_and_exactness(layer, tmp_path):
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    model = _model(layer)
    cls = type(model.model.layers[0].mixer)
    ref_logits, ref_grads = _step(model, ids)
    tracer = attach_tracer(model, rank=3)
    logits, grads = _step(model, ids)
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)

    path = tracer.save(str(tmp_path / "rank3.json"))
    with open(path) as fh:
        trace = json.load(fh)
    events = load_events(path)
    assert {e["pid"] for e in trace["traceEvents"]} == {3}
    for e in events:
        assert e["ph"] in ("X", "i") and isinstance(e["ts"], float) and e["tid"] in (0, 1, 2)
        assert e["ph"] != "X" or e["dur"] >= 0
    spans = {e["name"]: e for e in events}
    for layer_idx in (0, 1):
        for part in ("block", "scan", "mlp"):
            fwd, bwd = spans[f"L{layer_idx} {part}"], spans[f"L{layer_idx} {part}.bwd"]
            assert fwd["ts"] + fwd["dur"] <= bwd["ts"], part  # backward after forward
        blk, scan = spans[f"L{layer_idx} block"], spans[f"L{layer_idx} scan"]
        assert blk["ts"] <= scan["ts"] and scan["ts"] + scan["dur"] <= blk["ts"] + blk["dur"]
        bb, sb = spans[f"L{layer_idx} block.bwd"], spans[f"L{layer_idx} scan.bwd"]
        assert bb["ts"] <= sb["ts"] and sb["ts"] + sb["dur"] <= bb["ts"] + bb["dur"] + 1.0
    # backward runs the layers last to first
    assert spans["L1 scan.bwd"]["ts"] < spans["L0 scan.bwd"]["ts"]

    merged = merge_traces([path, path], str(tmp_path / "all.json"))
    assert len(load_events(merged)) == 2 * len(events)

    detach_tracer(model)
    assert type(model.model.layers[0].mixer) is cls and "scan" not in vars(model.model.layers[0].mixer)
    assert not model.model.layers[0]._forward_hooks and not model.model.layers[0]._forward_pre_hooks
    n = len(tracer.events)
    _step(model, ids)
    assert len(tracer.events) == n  # nothing recorded after detach
    with pytest.raises(ValueError, match="already attached"):
        attach_tracer(model) and attach_tracer(model)
