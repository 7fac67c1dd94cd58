"""The Triton kernels of Titans and LaCT (models/ops/titans/triton.py, models/ops/lact/triton.py) under TRITON_INTERPRET=1 on CPU,
against the PyTorch path: outputs, final state and every gradient (≤ 1e-4 relative to the largest
value of each tensor), fp32 and bf16 inputs, padded shapes, and whole layers called in two pieces
with their state (the partial chunks go through PyTorch).

Triton picks its interpreter when it is imported, so the checks run in one child process started
with TRITON_INTERPRET=1 (``python -m tests.models.test_triton_memory`` prints them as JSON).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.ops.lact import triton as lact_triton
from models.ops.titans import triton as titans_triton
from tests.models.helpers import run_interpreted

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4


def _err(a, b):
    """max |a − b| relative to max |b| (absolute where b is 0)."""
    a, b = a.detach().float(), b.detach().float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30 if b.abs().max() > 0 else 1.0)


def _compare(names, got, ref, prefix=""):
    errs = {}
    for n, a, b in zip(names, got, ref):
        if a is None or b is None:
            assert a is None and b is None, n  # both paths leave it out (e.g. s_last without momentum)
            continue
        errs[prefix + n] = _err(a, b)
    return errs


def _loss(tensors, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=gen)).sum() for t in tensors)


def _two_call_errors(layer, x, cut=21):
    """The layer on x in two calls (x[:, :cut] then the rest, with the state), kernels (MEMTRAIN_TRITON=1)
    against PyTorch (=0): errors of the output, every floating state tensor and every gradient."""
    res = {}
    for flag in ("0", "1"):
        os.environ["MEMTRAIN_TRITON"] = flag
        y1, s1 = layer(x[:, :cut])
        y2, s2 = layer(x[:, cut:], s1)
        st = {n: t for n, t in s2.tensors().items() if t.is_floating_point()}
        y = torch.cat([y1, y2], 1)
        grads = torch.autograd.grad(_loss([y, *st.values()]), [x, *layer.parameters()], allow_unused=True)
        res[flag] = (y, st, grads)
    assert res["1"][1].keys() == res["0"][1].keys()
    errs = {"out": _err(res["1"][0], res["0"][0])}
    errs.update({f"state_{n}": _err(res["1"][1][n], res["0"][1][n]) for n in res["0"][1]})
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    errs.update(_compare(names, res["1"][2], res["0"][2], "d_"))
    return errs


# ------------------------------------------------------------------------------------- Titans


def _titans_case(depth=2, mom=True, tau=1.0, N=3, B=1, H=2, b=16, d=16, h=32, dtype=torch.float32, seed=0):
    """The kernel against the PyTorch chunk loop (titans._segment per chunk); gradients of q, k, v,
    the gates θ, η, α, every coefficient tensor and the initial weights and momenta."""
    from models.ops.titans import chunk as titans

    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return scale * torch.randn(*s, generator=g)

    q, k, v = (rnd(N, B, H, b, d).to(dtype).requires_grad_() for _ in range(3))
    lr = (0.1 * torch.rand(N, B, H, b, generator=g)).requires_grad_()
    eta = (torch.rand(N, B, H, b, generator=g) if mom else torch.zeros(N, B, H, b)).requires_grad_()
    alpha = (0.1 * torch.rand(N, B, H, b, generator=g)).requires_grad_()
    dims = [d] + [h] * (depth - 1) + [d]
    W = [rnd(B, H, dims[i], dims[i + 1], scale=dims[i] ** -0.5).requires_grad_() for i in range(depth)]
    S = [rnd(B, H, dims[i], dims[i + 1], scale=0.1).requires_grad_() for i in range(depth)] if mom else None
    res = {}
    for fused in (False, True):
        co = titans.titans_coefficients(lr, eta, alpha)
        if fused:
            o, w, s = titans_triton.triton_titans_scan(W, S, q, k, v, *co, tau)
        else:
            cur, mm, outs = W, S, []
            for i in range(N):
                oi, cur, mm = titans._segment(cur, cur, mm, q[i].float(), k[i].float(), v[i].float(),
                                              [t[i] for t in co], tau)
                outs.append(oi)
            o, w, s = torch.stack(outs), cur, mm
        outs = [o, *w, *(s or [])]
        wrt = [q, k, v, lr, eta, alpha, *co, *W, *(S or [])]
        grads = torch.autograd.grad(_loss(outs), wrt, allow_unused=True)
        res[fused] = (outs, grads, o.dtype, [t.dtype for t in grads if t is not None])
    (o0, g0, *_), (o1, g1, out_dt, g_dt) = res[False], res[True]
    out_names = ["out"] + [f"W{i + 1}" for i in range(depth)] + ([f"S{i + 1}" for i in range(depth)] if mom else [])
    errs = _compare(out_names, o1, o0)
    g_names = "q k v lr eta alpha c s_last beta f m".split() + out_names[1:]
    errs.update(_compare(g_names, g1, g0, "d_"))
    errs["out_fp32"] = float(out_dt == torch.float32)
    errs["grad_dtypes_match"] = float(g_dt == res[False][3])
    return errs


def _titans_layer(depth=2, optimizer="momentum", max_grad_norm=1.0):
    """A whole TitansMemory (head dim 16, chunk 16) in two calls, 21 + 35 tokens: 1 full chunk + a tail,
    then a head that finishes it, 1 full chunk and a tail; kernels (MEMTRAIN_TRITON=1) against PyTorch (=0)."""
    from models.layers.titans import TitansMemory
    from tests.models.helpers import perturb

    torch.manual_seed(0)
    layer = perturb(TitansMemory(32, 2, chunk_size=16, depth=depth, expansion=2, optimizer=optimizer,
                                 max_grad_norm=max_grad_norm))
    return _two_call_errors(layer, torch.randn(1, 56, 32, requires_grad=True))


def _mixer_layer(kind, **cfg):
    """TNT and Hope call titans_scan_chunked for their memories, so they run the kernel too: the whole
    mixer in two calls (21 + 19 tokens), output, floating state and every gradient, kernel against PyTorch."""
    from models import MemoryLMConfig
    from models.hf.modeling_memory import build_mixer
    from tests.models.helpers import perturb

    torch.manual_seed(0)
    layer = perturb(build_mixer(MemoryLMConfig(hidden_size=32, num_attention_heads=2, memory_layer=kind,
                                               num_hidden_layers=1, conv_kernel=3, **cfg), 0))
    return _two_call_errors(layer, torch.randn(1, 40, 32, requires_grad=True))


# --------------------------------------------------------------------------------------- LaCT


def _lact_case(B=1, H=2, n=40, d=16, dh=32, dtype=torch.float32, block_t=16, block_j=16, seed=0):
    """The fused apply + gradient sums against swiglu_memory + lact_grads (n = 40: three token blocks,
    the last partial; d_h = 32: two d_h blocks)."""
    from models.ops.lact.chunk import lact_grads
    from models.common.parts import swiglu_memory

    g = torch.Generator().manual_seed(seed)
    shapes = {"W0": (d, dh), "W1": (dh, d), "W2": (d, dh)}
    W = {nm: (torch.randn(B, H, *s, generator=g) * s[0] ** -0.5).requires_grad_() for nm, s in shapes.items()}
    q, k, v = ((torch.randn(B, H, n, d, generator=g) / d**0.5).to(dtype).requires_grad_() for _ in range(3))
    lrs = [(0.1 * torch.rand(B, H, n, generator=g)).to(dtype).requires_grad_() for _ in range(3)]
    wrt = [W["W0"], W["W1"], W["W2"], q, k, v, *lrs]
    res = {}
    for fused in (False, True):
        if fused:
            o, G = lact_triton.triton_lact_chunk(W, q, k, v, *lrs, block_t=block_t, block_j=block_j)
        else:
            o, G = swiglu_memory(W, q.float()), lact_grads(W, k.float(), v.float(), *[t.float() for t in lrs])
        outs = [o, G["W0"], G["W1"], G["W2"]]
        grads = torch.autograd.grad(_loss(outs), wrt)
        res[fused] = (outs, grads, [t.dtype for t in grads])
    errs = _compare(["out", "G0", "G1", "G2"], res[True][0], res[False][0])
    errs.update(_compare("W0 W1 W2 q k v lr0 lr1 lr2".split(), res[True][1], res[False][1], "d_"))
    errs["out_fp32"] = float(res[True][0][0].dtype == torch.float32)
    errs["grad_dtypes_match"] = float(res[True][2] == res[False][2])
    return errs


def _lact_layer(optimizer="muon", momentum=True):
    """A whole LaCTLayer (fast head dim 16, d_h 32, chunk 16) in two calls, 21 + 19 tokens (a chunk,
    a piece that the second call finishes, a chunk, a tail); kernels against PyTorch."""
    from models.layers.lact import LaCTLayer
    from tests.models.helpers import perturb

    torch.manual_seed(0)
    layer = perturb(LaCTLayer(32, 2, num_lact_heads=2, chunk_size=16, window=8, inter_multi=2, base_lr=0.1,
                              optimizer=optimizer, momentum=momentum))
    return _two_call_errors(layer, torch.randn(1, 40, 32, requires_grad=True))


CASES = {
    "titans_depth1": lambda: _titans_case(depth=1),
    "titans_depth2": lambda: _titans_case(depth=2),
    "titans_depth2_sgd_noclamp": lambda: _titans_case(depth=2, mom=False, tau=None),
    "titans_depth2_padded": lambda: _titans_case(depth=2, b=12, d=12, h=24),
    "titans_bf16": lambda: _titans_case(depth=2, dtype=torch.bfloat16),
    "titans_layer": _titans_layer,
    "titans_layer_depth1_sgd": lambda: _titans_layer(depth=1, optimizer="sgd", max_grad_norm=None),
    "tnt_layer": lambda: _mixer_layer("tnt", tnt_global_chunk_size=16, tnt_local_chunk_sizes=[16],
                                      tnt_reset_period=32),
    "hope_layer": lambda: _mixer_layer("hope", hope_chunk_size=16, hope_cms_chunk_sizes=[16, 32]),
    "lact": _lact_case,
    "lact_padded": lambda: _lact_case(d=12, dh=20),
    "lact_bf16": lambda: _lact_case(dtype=torch.bfloat16),
    "lact_layer": _lact_layer,
    "lact_layer_sgd": lambda: _lact_layer(optimizer="sgd", momentum=False),
}


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted("tests.models.test_triton_memory")


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_pytorch(interpreted, case):
    errs = interpreted[case]
    flags = {n: v for n, v in errs.items() if n in ("out_fp32", "grad_dtypes_match")}
    assert all(v == 1.0 for v in flags.values()), flags
    # gradients of bf16 inputs are bf16: the two paths round differently summed fp32 values (2 ulps)
    bf16 = ("d_q", "d_k", "d_v", "d_lr0", "d_lr1", "d_lr2") if case.endswith("bf16") else ()
    bad = {n: v for n, v in errs.items() if n not in flags and not v <= (2**-7 if n in bf16 else TOL)}
    assert not bad, bad
    assert len(errs) > 8  # outputs, state and the gradients were all compared


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter accepts code that the compiler rejects (e.g. a non-constexpr global): every kernel
    and constexpr branch is compiled ahead of time for sm_90 (triton's own ptxas, no GPU needed) at the
    test sizes, and fits the shared memory of one H100/H200 block."""
    pytest.importorskip("triton")
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no nvidia backend")
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "bench.triton_sm90", "--titans", "16,16,32,16,2,1,1",
                          "--titans", "16,16,16,16,1,0,0", "--lact", "40,16,32"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8, rows
    assert all(r["shared_bytes"] <= 227 * 1024 for r in rows), rows


def test_selection(monkeypatch):
    x = torch.zeros(1)
    w = [torch.zeros(1, 2, 64, 128), torch.zeros(1, 2, 128, 64)]
    lw = {"W0": torch.zeros(1, 2, 64, 64), "W1": torch.zeros(1, 2, 64, 64), "W2": torch.zeros(1, 2, 64, 64)}
    monkeypatch.delenv("MEMTRAIN_TRITON", raising=False)
    assert not titans_triton.use_triton_titans(x, w, 64)  # CPU tensors: the PyTorch path
    assert not lact_triton.use_triton_lact(x, lw)
    monkeypatch.setenv("MEMTRAIN_TRITON", "1")
    on = titans_triton.AVAILABLE
    assert lact_triton.AVAILABLE == on
    assert titans_triton.use_triton_titans(x, w, 64) == on
    assert titans_triton.use_triton_titans(x, w[:1], 7) == on  # depth 1, any chunk (padded)
    assert not titans_triton.use_triton_titans(x, w + w[:1], 64)  # depth 3: the PyTorch loop
    assert not titans_triton.use_triton_titans(x.double(), w, 64)  # fp32 kernels
    assert lact_triton.use_triton_lact(x, lw) == on
    assert not lact_triton.use_triton_lact(x.double(), lw)
    monkeypatch.setenv("MEMTRAIN_TRITON", "0")
    assert not titans_triton.use_triton_titans(x, w, 64)
    assert not lact_triton.use_triton_lact(x, lw)


def test_cuda_selection_bounds(monkeypatch):
    """On CUDA: Titans automatic up to 64×64 memory elements and chunk 64, asked-for up to 2·64×64, never
    beyond (the default 64×128 + 128×64 memory needs 304 KB of shared memory on sm_90); LaCT automatic up
    to d = 128, asked-for up to 256; neither where the device's blocks have less shared memory."""
    monkeypatch.delenv("MEMTRAIN_TRITON", raising=False)
    monkeypatch.setattr(titans_triton, "AVAILABLE", True)
    monkeypatch.setattr(lact_triton, "AVAILABLE", True)
    shared = {"bytes": 227 * 1024}  # an H100/H200 block
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), {"shared_memory_per_block_optin": shared["bytes"]}))

    class Cuda:  # stands in for a CUDA tensor (only is_cuda, device, dtype and shape are read)
        is_cuda, device, dtype = True, "cuda:0", torch.float32

        def __init__(self, *shape):
            self.shape = shape

    def mats(*dims):
        return [torch.zeros(1, 1, a, b) for a, b in zip(dims[:-1], dims[1:])]

    titans, lact, x = titans_triton.use_triton_titans, lact_triton.use_triton_lact, Cuda(1)
    lw = {n: torch.zeros(1, 1, 128, 128) for n in ("W0", "W1", "W2")}
    assert titans(x, mats(64, 64), 64) and titans(x, mats(32, 64, 32), 64) and titans(x, mats(12, 24, 12), 5)
    assert not titans(x, mats(64, 64, 64), 16)  # 2·64×64: asked-for only
    assert not titans(x, mats(64, 64), 128)
    assert lact(Cuda(1, 1, 8, 128), lw) and not lact(Cuda(1, 1, 8, 192), lw)
    monkeypatch.setenv("MEMTRAIN_TRITON", "1")
    assert titans(x, mats(64, 64, 64), 64) and lact(Cuda(1, 1, 8, 192), lw)
    assert not titans(x, mats(64, 128, 64), 64)  # does not fit an H200 block: PyTorch even when asked
    assert not titans(x, mats(64, 64), 128) and not lact(Cuda(1, 1, 8, 384), lw)
    shared["bytes"] = 99 * 1024  # e.g. a consumer GPU's block
    assert not titans(x, mats(64, 64), 64) and not lact(Cuda(1, 1, 8, 64), lw)
    assert lact(Cuda(1, 1, 8, 128), lw)  # d = 128 runs 16-wide blocks: 88 KB


if __name__ == "__main__":  # the child process of the `interpreted` fixture
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    only = sys.argv[1:] or list(CASES)
    print(json.dumps({n: CASES[n]() for n in only}))
