"""The training ``--reset`` policies against the model run by hand: ``boundary`` = each document
alone, ``every:N`` = each N-token piece alone, ``never`` = one long stream processed in steps with
the state carried (the streaming data order gives row b of step s+1 right after row b of step s).
Bad values are one clear config error."""
import pytest
import torch

from data_pipeline.sampler import ResumableSampler
from pretrain.config import ConfigError, TrainConfig, reset_policy
from pretrain.train import CarriedState, data_config, reset_inputs
from tests.models.test_varlen import TOL, doc_ids_of, tiny


def test_reset_policy_values_and_errors():
    assert reset_policy("boundary") == ("boundary", None)
    assert reset_policy("never") == ("never", None)
    assert reset_policy("every:128") == ("every", 128)
    for bad in ("sometimes", "every:0", "every:-3", "every:x", "every"):
        with pytest.raises(ConfigError, match="--reset must be 'boundary', 'never' or 'every:N'"):
            TrainConfig(reset=bad).validate()
    with pytest.raises(ConfigError, match="--reset never .* use --cp 1"):
        TrainConfig(reset="never", cp=2).validate()
    with pytest.raises(ConfigError, match="longer than --seq-len 512"):
        TrainConfig(reset="every:1000").validate()
    assert data_config(TrainConfig(reset="never"), 1).layout == "streaming"
    assert data_config(TrainConfig(), 1).layout == "shuffled"


def test_boundary_and_every_n_equal_pieces_alone():
    model = tiny(["titans", "swa"])
    ids = torch.randint(0, 128, (2, 20))
    batch = {"input_ids": ids, "doc_ids": doc_ids_of([[0, 6, 13], [0, 2]], 20)}
    kw = reset_inputs(TrainConfig(), batch)
    assert torch.equal(kw["doc_ids"], batch["doc_ids"])
    every = model(ids, **reset_inputs(TrainConfig(reset="every:7"), batch)).logits
    for a in range(0, 20, 7):
        assert (every[:, a:a + 7] - model(ids[:, a:a + 7]).logits).abs().max() <= TOL
    assert reset_inputs(TrainConfig(reset="never"), batch) == {}


def test_streaming_order_continues_rows():
    s = ResumableSampler(23, 4, dp_rank=1, dp_size=2, layout="streaming")  # 4 lanes of 5 samples
    rows = [s.next_batch() for _ in range(6)]
    assert rows[:5] == [[10 + i, 15 + i] for i in range(5)]  # this rank's lanes 2 and 3
    assert rows[5] == [10, 15] and s.epoch == 1  # wrapped: lanes restart (CarriedState drops the state)
    with pytest.raises(Exception, match="layout"):
        ResumableSampler(23, 4).load_state_dict(s.state_dict())


def test_never_carries_the_state_across_steps():
    """Steps of a stream with the carried (detached) state = one call over the whole stream; the
    state restarts when the streaming order wraps; each step's gradient is its own (truncated)."""
    model = tiny(["ttt_linear", "lact"])
    stream = torch.randint(0, 128, (2, 3 * 9))
    carried = CarriedState(batches_per_epoch=3, loader_steps_done=0)
    logits = []
    for s in range(3):
        out = model(stream[:, 9 * s:9 * (s + 1)], **carried.inputs())
        carried.update(out)
        assert all(not t.requires_grad for t in _leaves(carried.state))
        logits.append(out.logits)
    assert (torch.cat(logits, 1) - model(stream).logits).abs().max() <= TOL
    again = model(stream[:, :9], **carried.inputs())  # wrapped around: from the initial state
    assert (again.logits - logits[0]).abs().max() == 0


def _leaves(state):
    from models.common.varlen import _leaves

    return [t for blk in state.layers for t in _leaves(blk)]


@pytest.mark.slow
def test_never_resumes_exactly_with_the_carried_state(tmp_path):
    """--reset never: 4 steps in one run = 2 steps, then a re-run to 4 (the carried memory state is
    in the checkpoint), bitwise."""
    from tests.pretrain.test_train import losses, run

    args = ("--reset", "never", "--micro-batch", 2, "--zero-stage", 0, "--save-every", 2)
    whole, part = tmp_path / "whole", tmp_path / "part"
    for out, steps in ((whole, 4), (part, 2), (part, 4)):
        res = run(out, "--steps", steps, *args)
        assert res.returncode == 0, res.stderr[-3000:]
    assert (part / "checkpoints" / "step_00000002" / "memory_rank00000.safetensors").is_file()
    assert losses(part) == losses(whole)
