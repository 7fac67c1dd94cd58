"""@triton.jit helpers shared by the families' kernels (ops/<family>/triton_kernels.py): padded tile loads and
stores, the fp32 matmul, tanh. Imported only where triton is installed."""
try:  # transformers' import check of an exported folder skips try blocks; triton.py imports this module
    # only where triton is installed (its AVAILABLE), so loading a folder never needs triton
    import triton
    import triton.language as tl
except ImportError as e:
    raise ImportError("the Triton kernels need triton (ops/<family>/triton.py imports them only where it is installed)") from e


@triton.jit
def _ld2(ptr, R: tl.constexpr, C: tl.constexpr, nr, nc):
    """A row-major [nr, nc] matrix at ptr as an [R, C] fp32 tile, zero-padded."""
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    return tl.load(ptr + r[:, None] * nc + c[None, :], mask=(r[:, None] < nr) & (c[None, :] < nc),
                   other=0.0).to(tl.float32)


@triton.jit
def _st2(ptr, x, R: tl.constexpr, C: tl.constexpr, nr, nc):
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    tl.store(ptr + r[:, None] * nc + c[None, :], x.to(ptr.dtype.element_ty),
             mask=(r[:, None] < nr) & (c[None, :] < nc))


@triton.jit
def _ld1(ptr, R: tl.constexpr, nr):
    r = tl.arange(0, R)
    return tl.load(ptr + r, mask=r < nr, other=0.0).to(tl.float32)


@triton.jit
def _st1(ptr, x, R: tl.constexpr, nr):
    r = tl.arange(0, R)
    tl.store(ptr + r, x.to(ptr.dtype.element_ty), mask=r < nr)


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0
