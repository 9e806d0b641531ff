"""kernels.swiglu against kernels.reference.swiglu: forward and the gradients of gate and up."""
import pytest
import torch

from kernels import reference
from kernels import swiglu, swiglu_packed
from kernels.testing import FWD_FACTOR, GRAD_FACTOR, assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(gate, up=None):
    """swiglu(gate, up), or swiglu_packed(gate) when up is None, against the float64 and same-dtype
    references: output and the gradient of every input."""
    inputs = [gate] if up is None else [gate, up]
    fn, ref = (swiglu_packed, reference.swiglu_packed) if up is None else (swiglu, reference.swiglu)
    before = [t.clone() for t in inputs]
    dy = torch.randn(*gate.shape[:-1], gate.shape[-1] // 2) if up is None else torch.randn(gate.shape)

    def run(f, cast):
        leaves = [cast(t).detach().requires_grad_() for t in inputs]
        out = f(*leaves)
        return out, torch.autograd.grad(out, leaves, dy.to(out.dtype))

    out, grads = run(fn, lambda t: t)
    out64, grads64 = run(ref, lambda t: t.double())
    out_ref, grads_ref = run(ref, lambda t: t)
    assert out.dtype == gate.dtype and out.shape == dy.shape
    assert_close_to_reference("out", out, out64, out_ref, FWD_FACTOR)
    for name, g, g64, gref in zip(["dgate", "dup"] if up is not None else ["dgate_up"], grads, grads64, grads_ref):
        assert_close_to_reference(name, g, g64, gref, GRAD_FACTOR)
    for t, b in zip(inputs, before):
        assert torch.equal(t, b), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 123])
@pytest.mark.parametrize("N", [16, 48, 80, 96, 128, 4096])
def test_forward_backward(dtype, rows, N):
    if N == 4096 and rows == 123:
        rows = 7  # keeps the interpreter quick; the slow sweep covers more
    _check(3 * torch.randn(rows, N, dtype=dtype), torch.randn(rows, N, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_projection(dtype):
    # The model's MLP: one (B, T, 2N) projection, gate and up are its halves, read in place.
    h = torch.randn(2, 9, 2 * 80, dtype=dtype)
    gate, up = h.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    _check(gate, up)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2 * 16), (5, 2 * 48), (2, 9, 2 * 33)])
def test_packed(dtype, shape):
    _check(torch.randn(shape, dtype=dtype))


def test_packed_strided_and_bad_width():
    _check(torch.randn(3, 4, 2 * 80).transpose(0, 1))
    with pytest.raises(ValueError, match="must be even"):
        swiglu_packed(torch.randn(4, 15))


def test_other_layouts():
    base = torch.randn(5, 3, 2 * 48)
    _check(base[..., :48].transpose(0, 1), base[..., 48:].transpose(0, 1))   # rows do not merge: copied
    _check(base[..., ::2], base[..., 1::2])                                 # column stride 2
    _check(torch.randn(2, 3, 4, 33), torch.randn(2, 3, 4, 33))               # leading dims, odd width


def test_extreme_gates():
    gate = torch.tensor([[-100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0] * 3])
    _check(gate, torch.randn(gate.shape))


@pytest.mark.parametrize("make,error,match", [
    (lambda: (torch.randn(4, 16), torch.randn(4, 8)), ValueError, "gate shape"),
    (lambda: (torch.randn(4, 16), torch.randn(4, 16, dtype=torch.float16)), TypeError, "must match"),
    (lambda: (torch.randn(4, 16).double(), torch.randn(4, 16).double()), TypeError, "float64"),
])
def test_bad_inputs(make, error, match):
    gate, up = make()
    with pytest.raises(error, match=match):
        swiglu(gate, up)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,N", [(300, 4096), (1000, 1), (3, 11008)])
def test_sweep(dtype, rows, N):
    _check(3 * torch.randn(rows, N, dtype=dtype), torch.randn(rows, N, dtype=dtype))
