"""kernels.linear_cross_entropy (Triton, the interpreter on CPU) and the PyTorch chunked path
(gpt.ops.torch_linear_cross_entropy) against kernels.reference.linear_cross_entropy in float64: the loss
and the gradients of x and weight, by the accuracy rule of kernels/testing.py."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from gpt.ops import torch_linear_cross_entropy
from kernels import reference
from kernels.testing import FWD_FACTOR, GRAD_FACTOR, assert_close_to_reference

REDUCTIONS = ["mean", "sum", "none"]


def _inputs(n, d, v, dtype, ignored=0.0):
    x = torch.randn(n, d, dtype=dtype)
    w = (torch.randn(v, d) / d ** 0.5).to(dtype)
    t = torch.randint(0, v, (n,))
    t[torch.rand(n) < ignored] = -1
    return x, w, t


def _check(fn, x, w, t, reduction, dy_scale=1.7, z_loss=0.0):
    """fn against the float64 and same-dtype references; dy: a non-unit incoming gradient."""
    before = [x.clone(), w.clone(), t.clone()]

    def run(f, cast):
        xs, ws = cast(x).detach().requires_grad_(), cast(w).detach().requires_grad_()
        out = f(xs, ws, t, ignore_index=-1, reduction=reduction, **({"z_loss": z_loss} if z_loss else {}))
        dy = dy_scale * (torch.ones_like(out) if reduction != "none" else torch.linspace(-1, 1, out.numel()))
        return out, torch.autograd.grad(out, (xs, ws), dy.to(out.dtype))

    out, grads = run(fn, lambda a: a)
    out64, grads64 = run(reference.linear_cross_entropy, lambda a: a.double())
    ref_out, ref_grads = run(reference.linear_cross_entropy, lambda a: a)
    assert out.dtype == torch.float32 and out.shape == out64.shape
    assert_close_to_reference("loss", out, out64, ref_out, FWD_FACTOR, dtype=x.dtype)
    for name, g, g64, gref, a in zip(("dx", "dweight"), grads, grads64, ref_grads, (x, w)):
        assert g.dtype == a.dtype
        assert_close_to_reference(name, g, g64, gref, GRAD_FACTOR)
    assert all(torch.equal(a, b) for a, b in zip((x, w, t), before)), "an input was modified"


FNS = {"triton": kernels.linear_cross_entropy, "torch": torch_linear_cross_entropy}


@pytest.mark.parametrize("path", FNS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
# 21 rows, width 19 and 301 tokens: a tail in every direction of the interpreter's 16-wide blocks (an odd width, a
# vocabulary no block divides); the GPT-2 vocabulary: test_gpt2_vocabulary_* below.
@pytest.mark.parametrize("n,d,v", [(5, 48, 65), (21, 19, 301)])
def test_matches_reference(path, reduction, dtype, n, d, v):
    _check(FNS[path], *_inputs(n, d, v, dtype, ignored=0.2), reduction)


@pytest.mark.parametrize("path", FNS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_z_loss_matches_reference(path, reduction, dtype):
    # logits ~ N(0, 1): lse ~ log(V) + 0.5, so at 0.1 the z term is a large part of the loss and its gradient.
    # 21 rows, width 40, 131 tokens: a tail in every direction of the interpreter's 16-wide blocks.
    _check(FNS[path], *_inputs(21, 40, 131, dtype, ignored=0.2), reduction, z_loss=0.1)


def test_reference_z_loss_is_the_mean_squared_lse_of_the_scored_rows():
    x, w, t = _inputs(40, 24, 97, torch.float64, ignored=0.3)
    lse = torch.logsumexp(x @ w.T, dim=-1)[t != -1]
    plain = reference.linear_cross_entropy(x, w, t)
    assert plain.item() == pytest.approx(F.cross_entropy(x @ w.T, t, ignore_index=-1).item(), rel=1e-12)
    with_z = reference.linear_cross_entropy(x, w, t, z_loss=0.01)
    assert (with_z - plain).item() == pytest.approx(0.01 * lse.square().mean().item(), rel=1e-12)


@pytest.mark.parametrize("path", FNS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_all_targets_ignored_give_zero_loss_and_gradients(path, reduction, z_loss):
    x, w, t = _inputs(9, 32, 65, torch.float32)
    t[:] = -1
    x.requires_grad_(), w.requires_grad_()
    loss = FNS[path](x, w, t, reduction=reduction, z_loss=z_loss)
    loss.sum().backward()
    assert torch.all(loss == 0) and torch.all(x.grad == 0) and torch.all(w.grad == 0)
    assert torch.isnan(F.cross_entropy(x @ w.T, t, ignore_index=-1))  # the documented difference


@pytest.mark.parametrize("path", FNS)
def test_non_contiguous_x_and_tied_weight(path):
    # x a strided view; the weight also used as an embedding: its gradient is the sum of both uses.
    _, w, t = _inputs(12, 40, 97, torch.float32)
    x = torch.randn(12, 2 * 40)[:, ::2]
    assert not x.is_contiguous()
    emb_ids = torch.randint(0, 97, (12,))

    def total(f, cast):
        ws = cast(w).detach().requires_grad_()
        xs = cast(x) + F.embedding(emb_ids, ws)[:, :1]
        loss = f(xs, ws, t, reduction="mean")
        return loss, torch.autograd.grad(loss, ws)[0]

    loss, dw = total(FNS[path], lambda a: a)
    loss64, dw64 = total(reference.linear_cross_entropy, lambda a: a.double())
    ref_loss, ref_dw = total(reference.linear_cross_entropy, lambda a: a)
    assert_close_to_reference("loss", loss, loss64, ref_loss, FWD_FACTOR)
    assert_close_to_reference("dweight", dw, dw64, ref_dw, GRAD_FACTOR)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gpt2_vocabulary_on_the_torch_path(reduction):
    _check(torch_linear_cross_entropy, *_inputs(23, 32, 50257, torch.float32, ignored=0.2), reduction)


@pytest.mark.slow  # over a minute in the interpreter (3,142 vocabulary tiles per row block): python -m pytest -m slow
def test_gpt2_vocabulary_on_the_triton_kernels():
    _check(kernels.linear_cross_entropy, *_inputs(5, 16, 50257, torch.float32, ignored=0.2), "mean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_torch_path_does_not_depend_on_the_chunk_size(reduction, z_loss):
    x, w, t = _inputs(50, 24, 301, torch.float32, ignored=0.2)
    dy = torch.linspace(-1, 1, 50) if reduction == "none" else torch.tensor(0.5)
    results = []
    for rows in (1, 7, 50, 1000):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = torch_linear_cross_entropy(xs, ws, t, reduction=reduction, z_loss=z_loss, chunk_rows=rows)
        results.append((out, *torch.autograd.grad(out, (xs, ws), dy)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            # each row's loss and dx come from the same row computation; dW adds chunk partial sums in another
            # order: float32 rounding of a sum of 50 terms
            torch.testing.assert_close(a, b, rtol=0, atol=50 * torch.finfo(torch.float32).eps * a.abs().max().item())


def test_bad_inputs_are_clear_errors():
    x, w, t = _inputs(4, 16, 65, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        kernels.linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="share D"):
        kernels.linear_cross_entropy(x, w[:, :8], t)
    with pytest.raises(ValueError, match="reduction"):
        torch_linear_cross_entropy(x, w, t, reduction="avg")


@pytest.mark.parametrize("path", FNS)
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_fullgraph_compile_forward_backward(path, z_loss):
    """Both paths trace under torch.compile(fullgraph=True) (the Triton one as a custom op), same results."""
    torch._dynamo.reset()
    x, w, t = _inputs(21, 32, 65, torch.float32, ignored=0.2)

    def grads(fn):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xs, ws, t, reduction="mean", z_loss=z_loss)
        return out, *torch.autograd.grad(out, (xs, ws))

    want = grads(FNS[path])
    got = grads(torch.compile(FNS[path], fullgraph=True, backend="aot_eager"))
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt)


def test_opcheck():
    x, w, t = _inputs(5, 16, 40, torch.float32, ignored=0.2)
    for z_loss in (0.0, 0.1):
        torch.library.opcheck(torch.ops.tritongpt.linear_cross_entropy,
                              (x.clone().requires_grad_(), w.clone().requires_grad_(), t, -1, z_loss))
