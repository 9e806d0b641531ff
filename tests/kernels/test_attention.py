"""kernels.attention against kernels.reference.attention in float64 (tolerance rule: kernels/testing.py).

Runs on the `device` fixture: a CUDA GPU, or Triton's interpreter on CPU (tests/conftest.py). The default
set covers MHA/GQA/MQA, sequence lengths off the block sizes, every head dim, causal and not, decode shapes,
non-contiguous inputs and each code path (FlashAttention-2 forward, split-KV decode, backward); `-m slow`
runs the full product, and tests/kernels/test_gpu_shapes.py the large shapes on a GPU.

The kernels take fp32 only in the interpreter (on a GPU fp32 tiles spill and miss the tensor cores, and the
model's fp32 runs take SDPA for attention). Where a test needs a dtype only for its logic it uses LOGIC_DTYPE:
fp32 in the interpreter, fp16 on a GPU; the accuracy rule is the same for both.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from kernels import KernelsUnavailable, reference
from kernels.testing import FWD_FACTOR, GRAD_FACTOR, assert_close_to_reference, error_bound
import kernels._attention as attn
from kernels._runtime import INTERPRETER_NUM_SMS

ON_GPU = torch.cuda.is_available()
LOGIC_DTYPE = torch.float16 if ON_GPU else torch.float32
FP32_ONLY_IN_THE_INTERPRETER = pytest.mark.skipif(ON_GPU, reason="fp32 attention runs only in Triton's interpreter; "
                                                                 "on a GPU the kernels take fp16/bf16")


def make_qkv(B, H, Hkv, Tq, Tk, D, dtype, layout="contiguous"):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D) in the given memory layout:
    'contiguous'; 'model' (q a transposed view of (B, T, H, D), k/v slices of one packed (B, T, 2, Hkv, D)
    tensor, as a model with fused projections passes them); 'strided_d' (head dim not unit-stride)."""
    if layout == "contiguous":
        q = torch.randn(B, H, Tq, D)
        k, v = torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    elif layout == "model":
        q = torch.randn(B, Tq, H, D).transpose(1, 2)
        kv = torch.randn(B, Tk, 2, Hkv, D)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    elif layout == "strided_d":
        q = torch.randn(B, H, Tq, 2 * D)[..., ::2]
        k, v = torch.randn(B, Hkv, Tk, D + 3)[..., :D], torch.randn(B, Hkv, Tk, D, 2)[..., 1]
    else:
        raise ValueError(layout)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def reference_grads(q, k, v, do, causal, scale, dtype):
    """(out, dq, dk, dv) of the reference computed in `dtype`."""
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = reference.attention(qr, kr, vr, causal, scale)
    out.backward(do.to(dtype))
    return out.detach(), qr.grad, kr.grad, vr.grad


def check_attention(q, k, v, causal, scale=None, *, backward=True, fwd_kwargs=None, bwd_config=None):
    """Forward output, log-sum-exp and (optionally) dq/dk/dv against the float64 reference, with the
    same-dtype reference as the error baseline; also checks that the inputs are left unchanged."""
    dtype = q.dtype
    originals = [t.clone() for t in (q, k, v)]
    out, lse = attn.attention_fwd(q, k, v, causal, scale, **(fwd_kwargs or {}))
    do = torch.randn(q.shape, dtype=dtype)
    out64, dq64, dk64, dv64 = reference_grads(q, k, v, do, causal, scale, torch.float64)
    out_same, dq_same, dk_same, dv_same = reference_grads(q, k, v, do, causal, scale, dtype)
    assert_close_to_reference("out", out, out64, out_same, FWD_FACTOR)
    lse64 = reference.attention_lse(q.double(), k.double(), causal, scale)
    lse_same = reference.attention_lse(q, k, causal, scale)
    assert_close_to_reference("lse", lse * attn.LN2, lse64, lse_same, FWD_FACTOR)
    if backward:
        dq, dk, dv = attn.attention_bwd(do, q, k, v, out, lse, causal, scale, config=bwd_config)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert_close_to_reference("dq", dq, dq64, dq_same, GRAD_FACTOR)
        assert_close_to_reference("dk", dk, dk64, dk_same, GRAD_FACTOR)
        assert_close_to_reference("dv", dv, dv64, dv_same, GRAD_FACTOR)
    for before, after in zip(originals, (q, k, v)):
        assert torch.equal(before, after), "attention modified its inputs"


# (B, H, Hkv, T, D, causal, dtype): every T, D, head ratio, mask mode and dtype appears at least once.
COVERING = [
    (1, 4, 4, 64, 64, True, torch.float16),       # MHA, T a multiple of the blocks
    (2, 4, 2, 129, 80, True, torch.float16),      # GQA 2, T one past a block, padded head dim
    (1, 8, 2, 300, 32, True, LOGIC_DTYPE),      # GQA 4, several blocks and a tail
    (1, 4, 1, 17, 128, False, torch.float16),     # MQA, non-causal, widest head
    (2, 4, 1, 129, 16, False, LOGIC_DTYPE),     # MQA, smallest head
    (1, 2, 2, 17, 16, True, LOGIC_DTYPE),
    (1, 4, 2, 64, 128, False, torch.float16),
    (1, 4, 2, 300, 64, True, torch.float16),
    (1, 4, 4, 1, 64, True, torch.float16),        # T = 1 (decode kernel path)
    (1, 6, 2, 129, 96, True, LOGIC_DTYPE),      # GQA 3, head dim 96
    (1, 4, 2, 129, 64, True, torch.bfloat16),     # bf16: dots upcast in the interpreter
    (1, 4, 1, 17, 80, False, torch.bfloat16),
]


@pytest.mark.parametrize("B,H,Hkv,T,D,causal,dtype", COVERING)
def test_matches_reference(B, H, Hkv, T, D, causal, dtype):
    check_attention(*make_qkv(B, H, Hkv, T, T, D, dtype), causal)


@pytest.mark.parametrize("Tq,Tk,H,Hkv,causal,dtype", [
    (1, 1, 4, 2, True, torch.float16), (1, 100, 4, 2, True, torch.float16), (1, 100, 4, 1, False, LOGIC_DTYPE),
    (1, 1000, 8, 2, True, torch.float16), (1, 1000, 4, 4, False, LOGIC_DTYPE), (1, 1000, 8, 1, True, torch.bfloat16),
    (5, 300, 8, 2, True, LOGIC_DTYPE), (4, 256, 8, 2, True, torch.float16), (16, 70, 4, 4, True, torch.float16),
    (40, 100, 4, 2, True, torch.float16),
])
def test_kv_cache_shapes(Tq, Tk, H, Hkv, causal, dtype):
    """Tq < Tk with the causal mask aligned to the end (decode and chunked prefill), model memory layout."""
    check_attention(*make_qkv(2, H, Hkv, Tq, Tk, 64, dtype, layout="model"), causal)


def check_single_key_fp32(q, k, v, causal):
    """With one key the softmax is constant, P = 1: PyTorch's fp32 dq and dk are exactly 0 and dv = sum dO, so
    the rule's bound is about one ulp. The kernel recomputes P = exp2(s - lse2) with s summed in another order
    than the forward's (K Q^T instead of Q K^T), so P = 1 +- a few ulps, and forms dS = P (dP - delta) with
    delta = rowsum(dO * O) summed in another order than dP = dO V^T. Here the rule's bound is widened by those
    worst-case fp32 dot-product errors (D * eps * sum |a_d b_d|), orders of magnitude below what a wrong
    formula gives; the output and lse follow the rule unchanged."""
    assert k.shape[2] == 1 and q.dtype == torch.float32
    check_attention(q, k, v, causal, backward=False)
    out, lse = attn.attention_fwd(q, k, v, causal)
    do = torch.randn_like(q)
    dq, dk, dv = attn.attention_bwd(do, q, k, v, out, lse, causal)
    _, dq64, dk64, dv64 = reference_grads(q, k, v, do, causal, None, torch.float64)
    _, _, _, dv_same = reference_grads(q, k, v, do, causal, None, torch.float32)
    D, group, eps = q.shape[-1], q.shape[1] // k.shape[1], torch.finfo(torch.float32).eps
    k_rep, v_rep = (t.repeat_interleave(group, dim=1) for t in (k, v))
    dot_noise = lambda a, b: 2 * D * eps * (a.abs() @ b.abs().transpose(-2, -1)).max().item()
    p_noise = dot_noise(q, k_rep) / D ** 0.5  # error of s = q.k * scale in natural-log units ~ relative error of P
    dv_bound = error_bound(dv64, dv_same, GRAD_FACTOR, torch.float32) + p_noise * group * do.abs().max().item()
    assert (dv.double() - dv64).abs().max().item() <= dv_bound
    ds_noise = dot_noise(do, v_rep) / D ** 0.5
    assert (dq.double() - dq64).abs().max().item() <= ds_noise * k.abs().max().item()
    assert (dk.double() - dk64).abs().max().item() <= ds_noise * q.abs().max().item() * group


@FP32_ONLY_IN_THE_INTERPRETER
@pytest.mark.parametrize("causal", [True, False])
def test_single_key_fp32(causal):
    check_single_key_fp32(*make_qkv(2, 4, 2, 1, 1, 64, torch.float32), causal)


@pytest.mark.parametrize("split_kv", [0, 1, 3, 8])
def test_split_kv_paths_agree(split_kv):
    """The FlashAttention-2 forward (0) and the split-KV decode with 1, 3 or 8 key splits."""
    check_attention(*make_qkv(1, 8, 2, 2, 1000, 64, torch.float16), True, backward=False,
                    fwd_kwargs=dict(split_kv=split_kv))


def test_split_kv_auto_splits_long_cache():
    """The automatic choice really splits a long cache (so the combine kernel runs)."""
    n_splits, keys_per_split = attn._num_splits(2, 1000, 64, INTERPRETER_NUM_SMS)
    assert n_splits > 1 and n_splits * keys_per_split >= 1000


@pytest.mark.parametrize("fwd,bwd", [
    (attn.Config(16, 32, 4, 1), (attn.Config(16, 32, 4, 1), attn.Config(32, 16, 4, 1))),
    (attn.Config(32, 16, 4, 1), (attn.Config(32, 16, 4, 1), attn.Config(16, 32, 4, 1))),
])
@pytest.mark.parametrize("Tq,Tk", [(77, 77), (50, 130)])
def test_small_blocks(fwd, bwd, Tq, Tk):
    """Several diagonal blocks per row/column, unequal block sizes, Tq < Tk with an offset that is not a
    multiple of either block."""
    check_attention(*make_qkv(1, 4, 2, Tq, Tk, 32, LOGIC_DTYPE), True,
                    fwd_kwargs=dict(config=fwd, split_kv=0), bwd_config=bwd)


@pytest.mark.parametrize("Tq,Tk,split_kv", [(5, 77, 3), (7, 64, 2), (3, 40, 1)])
def test_decode_small_blocks(Tq, Tk, split_kv):
    """Split-KV decode with 16-key blocks: causally hidden keys inside full blocks and across splits."""
    check_attention(*make_qkv(2, 4, 2, Tq, Tk, 32, LOGIC_DTYPE), True, backward=False,
                    fwd_kwargs=dict(config=attn.Config(16, 16, 4, 1), split_kv=split_kv))


@FP32_ONLY_IN_THE_INTERPRETER
@pytest.mark.parametrize("split_kv", [0, None])
def test_more_queries_than_keys(split_kv):
    """Causal with Tq > Tk (never in the model): the first Tq - Tk queries see no key; like the reference
    they give 0 (log-sum-exp -inf) and zero gradients."""
    q, k, v = make_qkv(1, 4, 2, 12, 5, 32, torch.float32)
    out, lse = attn.attention_fwd(q, k, v, True, split_kv=split_kv)
    ref = reference.attention(q.double(), k.double(), v.double(), True)
    ref_lse = reference.attention_lse(q.double(), k.double(), True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and torch.isneginf(lse[:, :, :7]).all()
    torch.testing.assert_close(lse[:, :, 7:].double() * attn.LN2, ref_lse[:, :, 7:], atol=1e-5, rtol=1e-5)
    do = torch.randn_like(q)
    dq, dk, dv = attn.attention_bwd(do, q, k, v, out, lse, True)
    _, dq64, dk64, dv64 = reference_grads(q, k, v, do, True, None, torch.float64)
    for got, want in ((dq, dq64), (dk, dk64), (dv, dv64)):
        torch.testing.assert_close(got.double(), torch.nan_to_num(want), atol=1e-5, rtol=1e-5)
    assert (dq[:, :, :7] == 0).all()


@pytest.mark.parametrize("layout", ["model", "strided_d"])
@pytest.mark.parametrize("T", [17, 129])
def test_noncontiguous_inputs(layout, T):
    check_attention(*make_qkv(2, 4, 2, T, T, 32, torch.float16, layout=layout), True)


def test_custom_scale_and_empty_cache():
    check_attention(*make_qkv(1, 4, 2, 33, 33, 32, LOGIC_DTYPE), True, scale=0.3)
    q, k, v = make_qkv(1, 4, 2, 3, 0, 32, LOGIC_DTYPE)
    out, lse = attn.attention_fwd(q, k, v, False)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_public_api_autograd_and_layout():
    """attention/attention_with_lse through the registered op: autograd for q, k, v (including the
    log-sum-exp's own gradient), the output's (B, T, H, D) memory layout, and a deterministic backward."""
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 40, 40, 32, LOGIC_DTYPE, layout="model"))
    out, lse = attn.attention_with_lse(q, k, v)
    assert out.transpose(1, 2).is_contiguous() and lse.dtype == torch.float32
    do, w = torch.randn(out.shape, dtype=out.dtype), torch.randn(lse.shape)
    ((out * do).sum() + (lse * w).sum()).backward()

    def reference_run(cast):
        leaves = [cast(t.detach()).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = reference.attention(*leaves), reference.attention_lse(*leaves[:2])
        ((ref_out * cast(do)).sum() + (ref_lse * w.to(ref_lse.dtype)).sum()).backward()
        return [ref_out, ref_lse] + [t.grad for t in leaves]
    ref64, ref_same = reference_run(lambda t: t.double()), reference_run(lambda t: t)
    for i, (name, got) in enumerate((("out", out), ("lse", lse), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))):
        assert_close_to_reference(name, got, ref64[i], ref_same[i], FWD_FACTOR if i < 2 else GRAD_FACTOR,
                                  torch.float32 if name == "lse" else q.dtype)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out, lse = attn.attention_with_lse(q, k, v)
    ((out * do).sum() + (lse * w).sum()).backward()
    for before, t in zip(grads, (q, k, v)):
        assert torch.equal(before, t.grad), "backward is not deterministic"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """The custom op traces into one graph (fake + autograd registrations); compiled == eager."""
    q, k, v = make_qkv(1, 4, 2, 24, 24, 16, LOGIC_DTYPE)

    def f(q, k, v):
        return (attn.attention(q, k, v) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    grads = []
    for fn in (f, compiled):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        loss = fn(qs, ks, vs)
        loss.backward()
        grads.append((loss.detach(), qs.grad, ks.grad, vs.grad))
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager)


def test_opcheck():
    q, k, v = make_qkv(1, 2, 1, 5, 7, 16, LOGIC_DTYPE, layout="model")
    torch.library.opcheck(torch.ops.tritongpt.attention_fwd.default, (q, k, v, True, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def _qkv_shapes(q, k, v=None, dtype=torch.float16):
    return lambda: tuple(torch.randn(shape, dtype=dtype) for shape in (q, k, v or k))


@pytest.mark.parametrize("make,match", [
    (_qkv_shapes((1, 4, 8, 16), (1, 3, 8, 16)), "multiple of key/value heads"),
    (lambda: (torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16).half(), torch.randn(1, 2, 8, 16)), "share one dtype"),
    (_qkv_shapes((4, 8, 16), (1, 2, 8, 16)), "must have 4 dims"),
    (_qkv_shapes((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), "same shape"),
    (_qkv_shapes((1, 4, 8, 16), (2, 2, 8, 16)), "batch sizes differ"),
    (_qkv_shapes((1, 4, 8, 16), (1, 2, 8, 32)), "head dims differ"),
    (_qkv_shapes((1, 2, 8, 256), (1, 2, 8, 256)), "head_dim 256"),
    (_qkv_shapes((1, 2, 8, 16), (1, 2, 8, 16), dtype=torch.float64), "dtype float64"),
])
def test_clear_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        attn.attention(*make())


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 4, 16, device="cpu")
    with pytest.raises(KernelsUnavailable, match="CUDA GPU"):
        attn.attention(q, q, q)


def test_compile_specs_cover_every_kernel():
    """Cheap structural check (the compilation itself runs in kernels.report): every kernel, both dtypes,
    head dims 64 and 128, and for the tensor-core kernels every table config."""
    specs = attn.compile_specs(quick=True)
    kernels = {s.kernel for s in specs}
    assert kernels == {"_attn_fwd_kernel", "_attn_decode_kernel", "_attn_combine_kernel",
                       "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
    for s in specs:
        assert set(s.signature) == set(s.fn.arg_names)
    labels = " ".join(s.label for s in specs)
    for needle in ("D=64", "D=128", "bf16", "fp16"):
        assert needle in labels
    full = attn.compile_specs()
    launched = {(s.kernel, s.constexprs["BLOCK_D"], s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps,
                 s.num_stages) for s in full if "BLOCK_N" in s.constexprs}
    tables = [("_attn_fwd_kernel", d, cfg) for d, cfg in attn.FWD_CONFIGS.items()]
    tables += [("_attn_bwd_dkdv_kernel", d, cfg) for d, cfg in attn.BWD_DKDV_CONFIGS.items()]
    tables += [("_attn_bwd_dq_kernel", d, cfg) for d, cfg in attn.BWD_DQ_CONFIGS.items()]
    tables += [("_attn_decode_kernel", d, cfg) for (d, _), cfg in attn.DECODE_CONFIGS.items()]
    for name, block_d, cfg in tables:
        assert (name, block_d, *cfg) in launched, (name, block_d, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("T,D,heads,causal,dtype", list(itertools.product(
    (1, 17, 64, 129, 300), (16, 32, 64, 80, 128), ((4, 4), (4, 2), (8, 2), (4, 1)), (True, False),
    (torch.float16, torch.float32, torch.bfloat16))))
def test_sweep(T, D, heads, causal, dtype):
    H, Hkv = heads
    if dtype == torch.float32 and ON_GPU:
        pytest.skip("fp32 attention runs only in Triton's interpreter; on a GPU the kernels take fp16/bf16")
    qkv = make_qkv(1, H, Hkv, T, T, D, dtype, layout="model")
    if T == 1 and dtype == torch.float32:
        check_single_key_fp32(*qkv, causal)
    else:
        check_attention(*qkv, causal)


@pytest.mark.slow
@pytest.mark.parametrize("Tk", (1, 63, 100, 1000, 3000))
@pytest.mark.parametrize("heads", ((4, 4), (8, 2), (8, 1)))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_decode_sweep(Tk, heads, dtype):
    H, Hkv = heads
    check_attention(*make_qkv(2, H, Hkv, 1, Tk, 128, dtype, layout="model"), True)
