"""Compile the Titans / LaCT / TTT Triton kernels ahead of time for a Hopper GPU (sm_90) on a machine
without one, and report what the compiler allotted: shared memory, registers and stack (spills).

    python -m bench.triton_sm90                            # the automatic-selection bounds
    python -m bench.triton_sm90 --titans 64,64,128,64,2   # chunk, dk, dh, dv, depth (momentum, clamp on)
    python -m bench.triton_sm90 --lact 2048,64,64          # n, d, d_h
    python -m bench.triton_sm90 --ttt linear,16,64 --ttt mlp,16,64   # inner, mini-batch, head dim (MLP: 4d)

Uses triton's own ptxas and the tile sizes and launch options of models/ops/{titans,lact}/triton.py
(``titans_meta``, ``lact_meta``; TTT: ``ops.ttt.triton.ttt_meta``). A kernel whose shared memory exceeds the GPU's (227 KB per block on
H100/H200) cannot launch; a large stack means register spills. Nothing here runs a kernel: speed
needs a GPU. Prints one JSON row per kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

INTS = {"N", "BH", "n", "dk", "dh", "dv", "d"}


def compile_sm90(fn, constexprs: dict, num_warps: int, num_stages: int, **options) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {a: "constexpr" if a in constexprs else "i32" if a in INTS else "fp32" if a in ("tau", "eps") else "*fp32"
           for a in fn.arg_names}
    t = time.time()
    k = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages, **options})
    row = {"kernel": fn.__name__, **constexprs, "num_warps": num_warps, "num_stages": num_stages, **options,
           "shared_bytes": k.metadata.shared, "compile_s": round(time.time() - t, 1)}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    for field in " ".join(line for line in usage.splitlines() if "REG:" in line).split():
        name, _, value = field.partition(":")
        if name in ("REG", "STACK"):
            row[{"REG": "registers", "STACK": "stack_bytes"}[name]] = int(value)
    return row


def titans_rows(chunk, dk, dh, dv, depth, mom=True, clamp=True):
    from models.ops.titans import triton as triton_titans, triton_kernels as K

    meta = triton_titans.titans_meta(chunk, dk, dh if depth == 2 else dv, dv)
    nw, ns = meta.pop("num_warps"), meta.pop("num_stages")
    c = dict(meta, DEPTH=depth, MOM=mom, CLAMP=clamp)
    return [compile_sm90(fn, c, nw, ns) for fn in (K._titans_fwd, K._titans_bwd)]


def lact_rows(n, d, dh):
    from models.ops.lact import triton as triton_lact, triton_kernels as K

    rows = []
    for backward, fns in ((False, (K._lact_apply, K._lact_grads)), (True, (K._lact_bwd_w, K._lact_bwd_x))):
        meta = triton_lact.lact_meta(n, d, dh, backward)
        nw, ns = meta.pop("num_warps"), meta.pop("num_stages")
        rows += [compile_sm90(fn, meta, nw, ns) for fn in fns]
    return rows


def ttt_rows(inner, b, d):
    from models.ops.ttt import triton as triton_ttt, triton_kernels as K

    h = d if inner == "linear" else 4 * d
    rows = []
    for fn in (K._ttt_linear_fwd, K._ttt_linear_bwd) if inner == "linear" else (K._ttt_mlp_fwd, K._ttt_mlp_bwd):
        meta = triton_ttt.ttt_meta(inner, b, d, h, backward=fn.__name__.endswith("bwd"))
        nw, ns, nreg = meta.pop("num_warps"), meta.pop("num_stages"), meta.pop("maxnreg")
        rows.append(compile_sm90(fn, meta, nw, ns, maxnreg=nreg))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--titans", action="append", default=[], help="chunk,dk,dh,dv,depth[,mom,clamp] (0/1)")
    ap.add_argument("--lact", action="append", default=[], help="n,d,dh")
    ap.add_argument("--ttt", action="append", default=[], help="linear|mlp,b,d (TTT-MLP's inner width is 4d)")
    args = ap.parse_args(argv)
    if not args.titans and not args.lact and not args.ttt:  # the largest automatically selected shapes
        args.titans = ["64,64,64,64,1", "64,32,64,32,2"]
        args.lact = ["2048,128,128"]
        args.ttt = ["linear,16,64", "mlp,16,64"]
    for spec in args.titans:
        v = [int(x) for x in spec.split(",")]
        for row in titans_rows(*v[:5], *(bool(x) for x in v[5:7])):
            print(json.dumps(row), flush=True)
    for spec in args.lact:
        for row in lact_rows(*(int(x) for x in spec.split(","))):
            print(json.dumps(row), flush=True)
    for spec in args.ttt:
        inner, b, d = spec.split(",")
        for row in ttt_rows(inner, int(b), int(d)):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
