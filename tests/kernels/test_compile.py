"""The Triton ops under torch.compile: registered as custom ops, so fullgraph=True traces them
(forward and backward) without graph breaks, and torch.library.opcheck accepts their registration."""
import pytest
import torch

from kernels import rms_norm, rope, rope_qk, swiglu, swiglu_packed


def _block(x, res, w, q, k, cos, sin, proj):
    """A miniature of the model's use of every op, ending in a scalar."""
    y, h = rms_norm(x, w, 1e-6, residual=res)
    q_rot, k_rot = rope_qk(q, k, cos, sin)
    gate, up = proj.chunk(2, dim=-1)
    z = rms_norm(h, w, 1e-5)
    return (y * z).sum() + (q_rot * rope(q, cos, sin)).sum() + k_rot.square().sum() + (swiglu(gate, up) * swiglu_packed(proj)).sum()


def _inputs():
    B, H, Hkv, T, D, C = 2, 4, 2, 5, 16, 32
    angles = torch.rand(T, D // 2)
    return [torch.randn(B, T, C), torch.randn(B, T, C), torch.randn(C), torch.randn(B, H, T, D),
            torch.randn(B, Hkv, T, D), angles.cos(), angles.sin(), torch.randn(B, T, 2 * 48)]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    inputs = _inputs()
    diff = [0, 1, 2, 3, 4, 7]  # cos/sin are constants

    def grads(fn):
        leaves = [t.clone().requires_grad_(i in diff) for i, t in enumerate(inputs)]
        out = fn(*leaves)
        return out, torch.autograd.grad(out, [leaves[i] for i in diff])

    want, want_grads = grads(_block)
    got, got_grads = grads(torch.compile(_block, fullgraph=True, backend=backend))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_no_graph_breaks():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_block)(*_inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("op,args", [
    ("rms_norm", lambda: (torch.randn(3, 16, requires_grad=True), torch.randn(16, requires_grad=True), 1e-6)),
    ("rms_norm_residual", lambda: (torch.randn(3, 16, requires_grad=True), torch.randn(16, requires_grad=True),
                                   torch.randn(3, 16, requires_grad=True), 1e-6)),
    ("rope", lambda: (torch.randn(1, 2, 3, 16, requires_grad=True), torch.randn(3, 8), torch.randn(3, 8))),
    ("rope_qk", lambda: (torch.randn(1, 2, 3, 16, requires_grad=True), torch.randn(1, 1, 3, 16, requires_grad=True),
                         torch.randn(3, 8), torch.randn(3, 8))),
    ("swiglu", lambda: (torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True))),
    ("swiglu_packed", lambda: (torch.randn(3, 32, requires_grad=True),)),
])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.tritongpt, op), args())
