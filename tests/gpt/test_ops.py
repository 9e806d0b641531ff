"""The PyTorch path of gpt/ops.py against kernels/reference.py, and the dispatch rules."""
import pytest
import torch

import kernels
from gpt import GPT, GPTConfig, ops
from gpt.errors import ConfigError
from kernels import KernelsUnavailable, reference
from kernels.testing import FWD_FACTOR, GRAD_FACTOR, assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16]


def check(name, fn, ref_fn, args, factor):
    out = fn(*args)
    ref64 = ref_fn(*[a.double() for a in args])
    same = ref_fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref64 if isinstance(ref64, tuple) else (ref64,)
    sames = same if isinstance(same, tuple) else (same,)
    for i, (o, r, s) in enumerate(zip(outs, refs, sames)):
        assert o.dtype == s.dtype, f"{name}[{i}] dtype {o.dtype} != reference {s.dtype}"
        assert_close_to_reference(f"{name}[{i}]", o, r, s, factor=factor)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_rms_norm(dtype):
    x = torch.randn(5, 7, 96).to(dtype)
    w = torch.randn(96)
    check("rms_norm", lambda x, w: ops.torch_rms_norm(x, w, 1e-6), lambda x, w: reference.rms_norm(x, w, 1e-6),
          (x, w.to(dtype) if dtype == torch.float32 else w), factor=2.0)


def test_torch_rms_norm_residual_keeps_the_stream_dtype():
    stream, branch, w = torch.randn(3, 64), torch.randn(3, 64).bfloat16(), torch.ones(64)
    y, h = ops.torch_rms_norm(stream, w, 1e-6, residual=branch)
    assert h.dtype == torch.float32 and y.dtype == torch.float32
    y_ref, h_ref = reference.rms_norm(stream, w, 1e-6, residual=branch.float())
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_rope(dtype):
    x = torch.randn(2, 3, 17, 48).to(dtype)
    cos, sin = torch.randn(17, 24), torch.randn(17, 24)
    # Computed in x's dtype: two products and a sum, each rounded, against one rounding in the
    # reference; so up to 3x the reference's error, +1 for the rounded cos/sin inputs.
    check("rope", ops.torch_rope, reference.rope, (x, cos, sin), factor=4.0 if dtype != torch.float32 else 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_swiglu(dtype):
    g, u = torch.randn(4, 33, 80).to(dtype), torch.randn(4, 33, 80).to(dtype)
    # silu rounded to dtype before the product: two roundings against one in the reference.
    check("swiglu", ops.torch_swiglu, reference.swiglu, (g, u), factor=2.0 if dtype == torch.float32 else 3.0)


@pytest.mark.parametrize("hq,hkv,tq,tk", [(4, 4, 9, 9), (4, 2, 9, 9), (4, 1, 1, 12), (4, 2, 3, 12)])
def test_sdpa_attention_matches_reference(hq, hkv, tq, tk):
    q = torch.randn(2, hq, tq, 16)
    k, v = torch.randn(2, hkv, tk, 16), torch.randn(2, hkv, tk, 16)
    check("attention", ops.sdpa_attention, reference.attention, (q, k, v), factor=2.0)


def _attention_and_grads(fn, q, k, v, do, dtype):
    """fn's output and dq, dk, dv on copies of q, k, v cast to dtype."""
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = fn(qr, kr, vr)
    out.backward(do.to(dtype))
    return out.detach(), qr.grad, kr.grad, vr.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (3, 1)])
@pytest.mark.parametrize("t,block", [(21, 8), (16, 8), (5, 8)])
def test_causal_matmul_attention_matches_reference(dtype, hq, hkv, t, block):
    """Query blocks of 8 over 21 positions (8, 8, then 5 rows), an exact multiple, and one partial
    block; forward and every gradient, with the same-dtype reference's error as the baseline."""
    q = torch.randn(2, t, hq, 24).transpose(1, 2).to(dtype)  # the model's strided layout
    k, v = torch.randn(2, hkv, t, 24).to(dtype), torch.randn(2, hkv, t, 24).to(dtype)
    do = torch.randn(2, hq, t, 24)
    originals = [x.clone() for x in (q, k, v)]
    got = _attention_and_grads(lambda *a: ops.causal_matmul_attention(*a, block=block), q, k, v, do, dtype)
    want64 = _attention_and_grads(reference.attention, q, k, v, do, torch.float64)
    same = _attention_and_grads(reference.attention, q, k, v, do, dtype)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert got[i].dtype == dtype and got[i].shape == want64[i].shape
        assert_close_to_reference(name, got[i], want64[i], same[i], FWD_FACTOR if i == 0 else GRAD_FACTOR)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), originals))


def _saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd keeps for the backward of fn(*args)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def test_causal_matmul_attention_keeps_linear_memory_for_the_backward():
    """What the backward keeps: q, k, a contiguous copy of v (not the fused projection it is a view of), the
    output and an fp32 log-sum-exp per query row; no (T, T) probabilities, which at T = 256 would be 16x
    q's size per head."""
    B, T, hq, hkv, D = 2, 256, 4, 2, 16
    qkv = torch.randn(B, T, (hq + 2 * hkv) * D, requires_grad=True)
    q, k, v = (x.view(B, T, -1, D).transpose(1, 2) for x in qkv.split([hq * D, hkv * D, hkv * D], dim=-1))
    q, k = q * 1.0, k * 1.0   # as in the model: q and k are RoPE's new tensors, v a view of the projection
    saved = _saved_bytes(lambda *a: ops.causal_matmul_attention(*a, block=64), q, k, v)
    elem = torch.finfo(torch.float32).bits // 8
    want = elem * B * T * D * (hq + hkv + hkv + hq) + 4 * B * hq * T
    assert saved == want, (saved, want)


def test_the_packed_swiglu_keeps_only_its_input_and_gets_the_gradient_right():
    gu = torch.randn(4, 7, 96, dtype=torch.float64, requires_grad=True)
    assert _saved_bytes(ops.torch_swiglu_packed, gu) == gu.numel() * 8
    torch.autograd.gradcheck(ops.torch_swiglu_packed, (gu[:1, :3].detach().requires_grad_(),))
    for dtype in DTYPES:
        x = gu.detach().to(dtype).requires_grad_()
        dy = torch.randn(4, 7, 48)
        got = ops.torch_swiglu_packed(x)
        got.backward(dy.to(dtype))
        x64 = gu.detach().requires_grad_()
        reference.swiglu_packed(x64).backward(dy.double())
        xs = gu.detach().to(dtype).requires_grad_()
        same = reference.swiglu_packed(xs)
        same.backward(dy.to(dtype))
        assert got.dtype == dtype and x.grad.dtype == dtype
        assert_close_to_reference("swiglu_packed", got, reference.swiglu_packed(gu.detach()), same, FWD_FACTOR)
        assert_close_to_reference("d gate_up", x.grad, x64.grad, xs.grad, GRAD_FACTOR)


def test_sdpa_attention_takes_blocked_matmuls_for_short_causal_cpu_attention(monkeypatch):
    calls = []
    real = ops.causal_matmul_attention
    monkeypatch.setattr(ops, "causal_matmul_attention", lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw))
    limit = ops.CPU_MATMUL_ATTENTION_MAX_T
    for t in (1, 7, limit, limit + 1):
        q, k, v = torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
        check("attention", ops.sdpa_attention, reference.attention, (q, k, v), factor=2.0)
    ops.sdpa_attention(*(torch.randn(1, 2, 7, 8) for _ in range(3)), causal=False)  # not causal: SDPA
    ops.sdpa_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8))  # prefill: SDPA
    assert calls == [7, limit]  # 1 is the decode path; above the limit SDPA's flash kernel wins


def test_dispatch_rules(monkeypatch):
    assert ops.resolve("auto", "cpu") == "torch"
    assert ops.resolve("torch", "cpu") == "torch"
    assert ops.select("torch", "cpu") is ops.TORCH_OPS
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelsUnavailable, match="kernels='triton' cannot run here: Triton kernels need a CUDA GPU.*"
                                                 "TRITON_INTERPRET=1"):
        ops.resolve("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve("triton", "cpu") == "triton"
    assert ops.select("triton", "cpu").rms_norm is kernels.rms_norm
    with pytest.raises(ConfigError, match="unknown kernels mode"):
        ops.resolve("fast", "cpu")


def test_triton_model_built_on_cpu_fails_only_when_run_there(monkeypatch):
    """kernels='triton' resolves per device: building on a CPU is fine (the model may move to a GPU next);
    running there is a KernelsUnavailable naming the fix."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = GPT(GPTConfig(vocab_size=20, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, block_size=8), kernels="triton")
    assert "triton (unavailable on cpu)" in repr(model)
    with pytest.raises(KernelsUnavailable, match="TRITON_INTERPRET=1"):
        model(torch.zeros(1, 4, dtype=torch.long))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model.to("cpu")  # a move resolves again
    assert model.kernels_in_use() == "triton"


@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3)])
def test_fused_forms_match_an_independent_computation(hq, hkv):
    """Rotate-half RoPE is the complex product (x1 + i x2) e^(i angle) per position and pair."""
    q, k = torch.randn(2, hq, 9, 16, dtype=torch.float64), torch.randn(2, hkv, 9, 16, dtype=torch.float64)
    angle = torch.randn(9, 8, dtype=torch.float64)
    rq, rk = ops.torch_rope_qk(q, k, angle.cos(), angle.sin())

    def complex_rotation(x):
        z = torch.complex(x[..., :8], x[..., 8:]) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat((z.real, z.imag), dim=-1)
    torch.testing.assert_close(rq, complex_rotation(q), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rk, complex_rotation(k), rtol=1e-12, atol=1e-12)
    gu = torch.randn(3, 5, 64, dtype=torch.float64)
    gate, up = gu[..., :32], gu[..., 32:]
    torch.testing.assert_close(ops.torch_swiglu_packed(gu), gate / (1 + torch.exp(-gate)) * up)


def test_measuring_the_cpu_peak_leaves_the_global_rng_alone():
    from gpt.runtime import measure_matmul_flops
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    assert measure_matmul_flops(torch.device("cpu"), torch.float32, n=64, reps=1) > 0
    assert torch.equal(torch.rand(4), want)
