"""The PyTorch path of gpt/ops.py against kernels/reference.py, and the dispatch rules."""
import pytest
import torch

import kernels
from gpt import GPT, GPTConfig, ops
from gpt.errors import ConfigError
from kernels import KernelsUnavailable, reference
from kernels.testing import assert_close_to_reference

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
