"""bench.cp_sim: the simulator against the closed forms of docs/parallelism.md, its errors, and
(slow) its event order against a real 8-process gloo run recorded by parallel/trace.py."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from bench.cp_sim import (Costs, Link, Setup, best_2d, closed_form_pass, layout, order_of_sim, order_of_trace,
                          predict, programs, simulate, to_chrome)

FREE = Link(latency=0.0, bandwidth=math.inf, inter_latency=0.0, inter_bandwidth=math.inf)
# scan ≤ pre + post in both directions: the wavefront's delay per rank is exactly one scan
C = Costs(pre_f=1e-6, pre_b=2e-6, scan_f=1.5e-6, scan_b=3e-6, post_f=2e-6, post_b=4e-6, state_bytes=1e5,
          a2a_in_bytes=4e3, a2a_out_bytes=1e3, heads=32)


def serial(c: Costs, T: int, L: int, M: int = 1) -> float:
    return M * T * (L * c.block() + c.head_f + c.head_b)


@pytest.mark.parametrize("schedule", ["pass", "ulysses", "interleaved", "prefix"])
def test_one_rank_is_the_serial_cost(schedule):
    c = dataclasses.replace(C, head_f=3e-7, head_b=5e-7)
    M = 3 if schedule == "interleaved" else 1
    pr = predict(c, Setup(4096, 5, 32, 1, 1, M, schedule), Link())
    assert pr.step == pytest.approx(serial(c, 4096, 5, M), rel=1e-12)
    assert pr.efficiency == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("P", [2, 3, 8, 32, 128])
def test_pass_fill_is_the_closed_form(P):
    """step = serial/P + (P−1)·scan(T/P) forward and backward: efficiency L/(L+(P−1)f)."""
    T, L = 1 << 17, 24
    pr = predict(C, Setup(T, L, 32, 1, P, 1, "pass"), FREE)
    fill = (P - 1) * (C.scan_f + C.scan_b) * T / P
    assert pr.step == pytest.approx(serial(C, T, L) / P + fill, rel=1e-12)
    assert pr.efficiency == pytest.approx(closed_form_pass(C, T, L, P), rel=1e-12)


def test_pass_waits_when_the_scan_dominates():
    """scan > pre + post: the last rank's layers are paced by the previous rank's scans."""
    c = dataclasses.replace(C, scan_f=10e-6, scan_b=20e-6)
    T, L, P = 1 << 14, 4, 8
    pr = predict(c, Setup(T, L, 32, 1, P, 1, "pass"), FREE)
    assert pr.efficiency < closed_form_pass(c, T, L, P)


def test_interleaving_pays_the_fill_once_per_step():
    T, L, P, M = 1 << 16, 24, 32, 8
    pr = predict(C, Setup(T, L, 32, 1, P, M, "interleaved"), FREE)
    fill = (P - 1) * (C.scan_f + C.scan_b) * T / P
    assert pr.step == pytest.approx(serial(C, T, L, M) / P + fill, rel=1e-12)
    plain = predict(C, Setup(T, L, 32, 1, P, 1, "pass"), FREE)
    assert pr.step < M * plain.step
    assert pr.extra_activation == M


def test_ulysses_without_communication_cost_is_ideal_and_pays_its_all_to_alls():
    T, L = 1 << 16, 6
    assert predict(C, Setup(T, L, 32, 8, 1, 1, "ulysses"), FREE).efficiency == pytest.approx(1.0, rel=1e-12)
    link = Link(latency=1e-5, bandwidth=1e10, node_size=8)
    pr = predict(C, Setup(T, L, 32, 8, 1, 1, "ulysses"), link)
    n = T / 8
    a2a = link.all_to_all(range(8), C.a2a_in_bytes * n) + link.all_to_all(range(8), C.a2a_out_bytes * n)
    assert pr.step == pytest.approx(serial(C, T, L) / 8 + 2 * L * a2a, rel=1e-12)


def test_2d_contains_pass_and_ulysses():
    T, L, link = 1 << 16, 6, Link()
    assert predict(C, Setup(T, L, 32, 1, 16, 1, "2d"), link).step == pytest.approx(
        predict(C, Setup(T, L, 32, 1, 16, 1, "pass"), link).step, rel=1e-12)
    assert predict(C, Setup(T, L, 32, 16, 1, 1, "2d"), link).step == pytest.approx(
        predict(C, Setup(T, L, 32, 16, 1, 1, "ulysses"), link).step, rel=1e-12)
    # a 4 x 8 layout's wavefront is 8 deep, on a scan 4x shorter per rank: between the two
    b = best_2d(C, T, L, 32, 32, link)
    assert b.efficiency >= predict(C, Setup(T, L, 32, 1, 32, 1, "pass"), link).efficiency
    assert b.P_h * b.P_s == 32 and 32 % b.P_h == 0


def test_prefix_pays_the_summary_not_a_chain():
    T, L, P = 1 << 16, 6, 16
    pr = predict(C, Setup(T, L, 32, 1, P, 1, "prefix"), FREE)
    B, S = C.block(), C.scan_f + C.scan_b
    assert pr.efficiency == pytest.approx(B / (B + C.summary * S), rel=1e-12)


def test_simulator_reports_a_deadlock():
    progs = [[("r", "recv", "never", {})], [("c", "work", 1.0, {})]]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(progs, Link())


def test_layout_errors():
    with pytest.raises(ValueError, match="divide the heads"):
        layout("ulysses", 64, 32)
    with pytest.raises(ValueError, match="P_h dividing"):
        layout("2d", 32, 32, 3)
    with pytest.raises(ValueError, match="unknown schedule"):
        layout("zigzag", 8, 32)


def test_costs_file_errors(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"pre_f": 1, "bogus": 2}))
    with pytest.raises(SystemExit, match="unknown fields"):
        Costs.load(str(bad))
    with pytest.raises(SystemExit, match="cannot read"):
        Costs.load(str(tmp_path / "missing.json"))


def test_event_order_and_chrome_format_of_the_simulation():
    ev = simulate(programs(C, Setup(64, 2, 4, 1, 3, 1, "pass"), FREE), FREE)
    assert order_of_sim(ev[1]) == ["recv state L0", "L0 scan", "send state L0", "recv state L1", "L1 scan",
                                   "send state L1", "recv state L1 grad", "L1 scan.bwd", "send state L1 grad",
                                   "recv state L0 grad", "L0 scan.bwd", "send state L0 grad"]
    assert order_of_sim(ev[0])[:2] == ["L0 scan", "send state L0"]
    tr = to_chrome(ev)["traceEvents"]
    assert {e["pid"] for e in tr} == {0, 1, 2}
    assert order_of_trace([e for e in tr if e["pid"] == 1]) == order_of_sim(ev[1])


# ------------------------------------------------------------------ against a real gloo run
def traced_worker(seq: int):
    """One rank of an 8-process CP run of a 2-layer model (TTT-Linear and Gated DeltaNet: the
    scan-level pass), traced: its events."""
    import argparse

    from bench.cp import setup

    args = argparse.Namespace(hidden=64, heads=4, layers=2, vocab=128, seq=seq, mini_batch=8, layer="ttt_linear",
                              layer_pattern="ttt_linear,gated_deltanet", docs="", mode="pass", trace="unused")
    model, step = setup(args, 8)
    step()
    return model._tracer.trace()["traceEvents"]


@pytest.mark.slow
def test_schedule_matches_a_traced_8_process_run():
    """Per rank, the order of scan starts and state sends/receives (forward and backward) of a
    real 8-process gloo run equals the simulator's pass schedule."""
    from parallel.launch import run_distributed

    P, L = 8, 2
    runs = run_distributed(traced_worker, P, args=(8 * 24,), timeout=900)
    sim = simulate(programs(C, Setup(8 * 24, L, 4, 1, P, 1, "pass"), Link()), Link())
    for r in range(P):
        real = order_of_trace(runs[r])
        assert real == order_of_sim(sim[r]), f"rank {r}"
        assert len(real) == 2 * L * (1 + (r > 0) + (r < P - 1))
        sends = [e for e in runs[r] if e["name"].startswith("send state")]
        assert all(e["args"]["bytes"] > 0 and e["args"]["peer"] in (r - 1, r + 1) for e in sends)


def test_measure_block_costs_and_state_size():
    """--calibrate-block: positive per-token costs, and the state is TTT-Linear's fast weights."""
    import argparse

    from bench.cp_sim import measure_block

    args = argparse.Namespace(hidden=64, heads=4, layers=1, vocab=128, seq=32, mini_batch=8, layer="ttt_linear")
    c = measure_block(args, 32, repeats=1)
    d = 64 // 4
    assert c.state_bytes == 4 * 4 * (d * d + d)  # W1 [H, d, d] + b1 [H, 1, d], float32, one sequence
    assert min(c.pre_f, c.scan_f, c.scan_b, c.post_f, c.head_f) > 0
    assert c.a2a_in_bytes == (3 * 64 + 4) * 4 and c.heads == 4


def test_halo_makes_prepare_wait_for_the_previous_rank():
    """Setup(halo=True) (what --calibrate simulates: CPPassMixer exchanges the halo, at least its header,
    before each prepare): rank 1's prepare of a layer starts when rank 0's ends, and rank 0's prepare
    backward waits for rank 1's halo gradient."""
    import dataclasses

    c = dataclasses.replace(C, pre_f=3e-6, pre_b=5e-6)  # prepare longer than the scan: the halo wait shows
    for halo in (False, True):
        ev = simulate(programs(c, Setup(64, 2, 4, 1, 2, 1, "pass", halo=halo), FREE), FREE)
        pre0, pre1 = (next(e for e in ev[r] if e.name == "L0 pre") for r in (0, 1))
        assert pre1.t0 == (pre0.t1 if halo else 0.0)
        bwd0, bwd1 = (next(e for e in ev[r] if e.name == "L0 pre.bwd") for r in (0, 1))
        assert (bwd0.t0 >= bwd1.t1) if halo else (bwd0.t0 < bwd1.t1)
