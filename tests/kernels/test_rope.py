"""kernels.rope / rope_qk against kernels.reference: forward and the gradient of every rotated input."""
import pytest
import torch

from kernels import reference
from kernels import rope, rope_qk
from kernels.testing import FWD_FACTOR, GRAD_FACTOR, assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _table(T, D, start=0, theta=10000.0):
    """cos, sin (T, D//2) in fp32 for positions start .. start+T-1, as the model builds them."""
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(start, start + T, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _check(fn, ref_fn, xs, cos, sin):
    """Compare ours with the float64 and same-dtype references: outputs and all input gradients."""
    before = [x.clone() for x in xs]
    upstream = [torch.randn(x.shape) for x in xs]

    def run(f, cast):
        leaves = [cast(x).detach().requires_grad_() for x in xs]
        outs = f(*leaves, cast(cos), cast(sin))
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(upstream, outs)])
        return outs, grads

    outs, grads = run(fn, lambda t: t)
    outs64, grads64 = run(ref_fn, lambda t: t.double())
    outs_ref, grads_ref = run(ref_fn, lambda t: t)
    for i, (o, o64, oref, x) in enumerate(zip(outs, outs64, outs_ref, xs)):
        assert o.dtype == x.dtype and o.shape == x.shape and o.is_contiguous()
        assert_close_to_reference(f"out{i}", o, o64, oref, FWD_FACTOR)
    for i, (g, g64, gref) in enumerate(zip(grads, grads64, grads_ref)):
        assert_close_to_reference(f"grad{i}", g, g64, gref, GRAD_FACTOR)
    for x, b in zip(xs, before):
        assert torch.equal(x, b), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 17, 129])
@pytest.mark.parametrize("D", [16, 48, 80, 96, 128])
def test_rope(dtype, T, D):
    cos, sin = _table(T, D)
    _check(rope, reference.rope, [torch.randn(2, 3, T, D, dtype=dtype)], cos, sin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 1)])
def test_rope_qk_gqa(dtype, H, Hkv):
    T, D = 17, 48
    cos, sin = _table(T, D)
    q, k = torch.randn(2, H, T, D, dtype=dtype), torch.randn(2, Hkv, T, D, dtype=dtype)
    _check(rope_qk, reference.rope_qk, [q, k], cos, sin)


def test_transposed_views_from_fused_projection():
    # The model's layout: one (B, T, (H + 2*Hkv) * D) projection split and viewed as (B, H, T, D).
    B, T, H, Hkv, D = 2, 17, 4, 2, 80
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D)
    q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, Hkv, D).transpose(1, 2)
    assert not q.is_contiguous()
    cos, sin = _table(T, D)
    _check(rope_qk, reference.rope_qk, [q, k], cos, sin)
    _check(rope, reference.rope, [q], cos, sin)


def test_decode_offset_and_odd_strides():
    # A KV-cache step passes the table rows of its positions; tables may be any float dtype.
    cos, sin = _table(64, 32)
    x = torch.randn(1, 2, 3, 64, dtype=torch.bfloat16)[..., ::2]          # column stride 2
    _check(rope, reference.rope, [x], cos[40:43].bfloat16(), sin[40:43].bfloat16())
    table = torch.randn(5, 2 * 8)
    _check(rope, reference.rope, [torch.randn(2, 1, 5, 16)], table[:, :8], table[:, 8:])  # strided tables


def test_only_q_used_downstream():
    cos, sin = _table(5, 16)
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k = torch.randn(1, 1, 5, 16, requires_grad=True)
    q_rot, _ = rope_qk(q, k, cos, sin)
    q_rot.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    torch.testing.assert_close(q.grad, reference.rope(torch.ones_like(q), cos, -sin))


@pytest.mark.parametrize("make,error,match", [
    (lambda: (torch.randn(1, 2, 5, 15), *_table(5, 14)), ValueError, "must be even"),
    (lambda: (torch.randn(2, 5, 16), *_table(5, 16)), ValueError, "must have 4 dims"),
    (lambda: (torch.randn(1, 2, 5, 16), *_table(6, 16)), ValueError, r"must be \(T, D//2\)"),
    (lambda: (torch.randn(1, 2, 5, 16).double(), *_table(5, 16)), TypeError, "float64"),
])
def test_bad_inputs(make, error, match):
    x, cos, sin = make()
    with pytest.raises(error, match=match):
        rope(x, cos, sin)


def test_bad_qk_pairs():
    cos, sin = _table(5, 16)
    q = torch.randn(1, 4, 5, 16)
    with pytest.raises(TypeError, match="must match"):
        rope_qk(q, torch.randn(1, 2, 5, 16, dtype=torch.float16), cos, sin)
    with pytest.raises(ValueError, match="except in heads"):
        rope_qk(q, torch.randn(1, 2, 4, 16), cos, sin)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [2, 64, 256, 512])
def test_sweep(dtype, D):
    cos, sin = _table(300, D)
    _check(rope_qk, reference.rope_qk, [torch.randn(2, 8, 300, D, dtype=dtype), torch.randn(2, 2, 300, D, dtype=dtype)],
           cos, sin)
