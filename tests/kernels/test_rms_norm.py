"""kernels.rms_norm against kernels.reference.rms_norm: forward, every gradient, residual variant."""
import pytest
import torch

from kernels import reference
from kernels import _runtime
from kernels import KernelsUnavailable, rms_norm
from kernels._rms_norm import MAX_D
from kernels.testing import FWD_FACTOR, GRAD_FACTOR, assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(x, weight, residual=None, eps=1e-6):
    """Run ours, the float64 reference and the same-dtype reference with the same upstream
    gradients; compare outputs (2x rule) and the gradients of x, weight and residual (3x rule)."""
    inputs = [x, weight] + ([residual] if residual is not None else [])
    before = [t.clone() for t in inputs]

    def run(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in inputs]
        out = fn(leaves[0], leaves[1], eps, residual=leaves[2] if residual is not None else None)
        outs = list(out) if residual is not None else [out]
        grads_out = [cast(g) for g in upstream]
        grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
        return outs, grads

    upstream = [torch.randn(x.shape)] + ([torch.randn(x.shape)] if residual is not None else [])
    outs, grads = run(rms_norm, lambda t: t)
    outs64, grads64 = run(reference.rms_norm, lambda t: t.double())
    outs_ref, grads_ref = run(reference.rms_norm, lambda t: t)

    for name, o, o64, oref in zip(["y", "h"], outs, outs64, outs_ref):
        assert o.dtype == x.dtype and o.shape == x.shape
        assert_close_to_reference(name, o, o64, oref, FWD_FACTOR)
    for name, g, g64, gref, t in zip(["dx", "dweight", "dresidual"], grads, grads64, grads_ref, inputs):
        assert g.dtype == t.dtype, f"{name} dtype {g.dtype} != input dtype {t.dtype}"
        assert_close_to_reference(name, g, g64, gref, GRAD_FACTOR)
    for t, b in zip(inputs, before):
        assert torch.equal(t, b), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 123])
@pytest.mark.parametrize("D", [16, 48, 80, 96, 128])
def test_forward_backward(dtype, rows, D):
    _check(torch.randn(rows, D, dtype=dtype), torch.randn(D, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,D", [(1, 16), (5, 80), (123, 48)])
def test_residual(dtype, rows, D):
    _check(torch.randn(rows, D, dtype=dtype), torch.randn(D, dtype=dtype), torch.randn(rows, D, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_row(dtype):
    _check(torch.randn(3, 4096, dtype=dtype), torch.randn(4096, dtype=dtype),
           torch.randn(3, 4096, dtype=dtype))


def test_leading_dims_and_eps():
    _check(torch.randn(2, 3, 5, 96), 1 + 0.1 * torch.randn(96), eps=1e-2)


@pytest.mark.parametrize("x_dtype,w_dtype,r_dtype", [
    (torch.bfloat16, torch.float32, torch.float32),   # AMP: bf16 branch, fp32 weight and residual stream
    (torch.float32, torch.float32, torch.bfloat16),   # fp32 stream as x, bf16 branch as residual
    (torch.float16, torch.bfloat16, torch.bfloat16),  # neither x's dtype nor fp32: widened in the launcher
], ids=str)
def test_mixed_dtypes(x_dtype, w_dtype, r_dtype):
    _check(torch.randn(5, 48, dtype=x_dtype), torch.randn(48, dtype=w_dtype), torch.randn(5, 48, dtype=r_dtype))


def test_non_contiguous():
    base = torch.randn(3, 7, 2 * 80)
    _check(base[..., :80], torch.randn(80))                            # strided rows, read in place
    _check(base.transpose(0, 1)[..., 80:], torch.randn(80), base[..., :80].transpose(0, 1))  # rows do not merge
    _check(base[..., ::2], torch.randn(80))                            # column stride 2


def test_empty_input():
    x = torch.randn(0, 48, requires_grad=True)
    w = torch.randn(48, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == (0, 48)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(48))


def test_weight_gradient_is_reduced_over_all_rows():
    # More rows than backward programs: every program's partial sum must reach dW.
    x = torch.randn(37, 16)
    w = torch.ones(16, requires_grad=True)
    rms_norm(x, w).sum().backward()
    want = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).sum(0)
    torch.testing.assert_close(w.grad, want)


@pytest.mark.parametrize("make,error,match", [
    (lambda: (torch.randn(4, 16), torch.randn(15)), ValueError, "last dim must equal weight"),
    (lambda: (torch.randn(4, 16), torch.randn(1, 16)), ValueError, "weight must have 1 dims"),
    (lambda: (torch.randn(4, 16, dtype=torch.float64), torch.randn(16)), TypeError, "float64"),
    (lambda: (torch.randn(4, 16).int(), torch.randn(16)), TypeError, "int32"),
    (lambda: (torch.randn(2, MAX_D + 1), torch.randn(MAX_D + 1)), ValueError, "outside the supported"),
    (lambda: (torch.randn(1, 8200), torch.randn(8200)), ValueError, "multiples of 16"),
])
def test_bad_inputs(make, error, match):
    x, w = make()
    with pytest.raises(error, match=match):
        rms_norm(x, w)


def test_bad_residual():
    with pytest.raises(ValueError, match="residual shape"):
        rms_norm(torch.randn(4, 16), torch.randn(16), residual=torch.randn(4, 8))


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_runtime, "interpreting", lambda: False)
    with pytest.raises(KernelsUnavailable, match="TRITON_INTERPRET=1"):
        rms_norm(torch.randn(4, 16, device="cpu"), torch.randn(16, device="cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 17, 1000, 8191, MAX_D])
def test_sweep(dtype, D):
    _check(torch.randn(9, D, dtype=dtype), torch.randn(D, dtype=dtype), torch.randn(9, D, dtype=dtype))
    _check(torch.randn(300, D, dtype=dtype), torch.randn(D, dtype=dtype))


@pytest.mark.slow
def test_wide_offset_views_are_realigned():
    base = torch.randn(4, MAX_D + 3, dtype=torch.bfloat16)
    _check(base[:, 1:MAX_D + 1], torch.randn(MAX_D, dtype=torch.bfloat16), base[:, 3:])
