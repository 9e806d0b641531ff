"""Large shapes, on a CUDA GPU only (`gpu` mark; skipped elsewhere): long sequences, head dims 64 and 128,
GQA 4:1 and 8:1, and every model preset's shapes, in the dtypes the GPU runs (bf16, fp16). Same accuracy
rule as the interpreter tests (kernels/testing.py): error vs float64 within 2x (outputs) / 3x (gradients)
of PyTorch's error in the same dtype."""
import pytest
import torch

from gpt.config import preset_config, PRESETS
from gpt.model import rope_table
from kernels import reference, rms_norm, rope_qk, swiglu_packed
from kernels.testing import FWD_FACTOR, GRAD_FACTOR, assert_close_to_reference

from .test_attention import check_attention, make_qkv

pytestmark = pytest.mark.gpu
GPU_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("T", [1024, 4096])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,Hkv", [(8, 2), (16, 2)], ids=["GQA4", "GQA8"])
def test_attention_long_sequences(dtype, T, D, H, Hkv):
    check_attention(*make_qkv(1, H, Hkv, T, T, D, dtype, layout="model"), True)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("Tk", [1000, 4096])
@pytest.mark.parametrize("H,Hkv", [(8, 2), (16, 2)], ids=["GQA4", "GQA8"])
def test_decode_long_cache(dtype, Tk, H, Hkv):
    """One query per sequence against a long cache: the split-KV decode kernel and its combine step."""
    check_attention(*make_qkv(4, H, Hkv, 1, Tk, 128, dtype, layout="model"), True)


def _grads_check(name, fn, ref_fn, inputs, n_out=1):
    """Outputs and the gradients of every input against the float64 and same-dtype references."""
    upstream = None

    def run(f, cast):
        nonlocal upstream
        leaves = [cast(t).detach().requires_grad_(t.is_floating_point()) for t in inputs]
        outs = f(*leaves)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        if upstream is None:
            upstream = [torch.randn_like(o, dtype=torch.float32) for o in outs]
        diff = [t for t in leaves if t.requires_grad]
        return outs, torch.autograd.grad(outs, diff, [u.to(o.dtype) for u, o in zip(upstream, outs)])

    outs, grads = run(fn, lambda t: t)
    outs64, grads64 = run(ref_fn, lambda t: t.double() if t.is_floating_point() else t)
    outs_same, grads_same = run(ref_fn, lambda t: t)
    for i, (o, o64, os_) in enumerate(zip(outs, outs64, outs_same)):
        assert_close_to_reference(f"{name} out{i}", o, o64, os_, FWD_FACTOR)
    for i, (g, g64, gs) in enumerate(zip(grads, grads64, grads_same)):
        assert_close_to_reference(f"{name} grad{i}", g, g64, gs, GRAD_FACTOR)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_shapes(preset, dtype):
    """Each op at the shapes a preset's training step gives it: batch 4 x block_size tokens."""
    c = preset_config(preset)
    B, T = 4, c.block_size
    x, res = torch.randn(B, T, c.n_embd, dtype=dtype), torch.randn(B, T, c.n_embd, dtype=dtype)
    w = 1 + 0.1 * torch.randn(c.n_embd, dtype=torch.float32)   # the AMP case: fp32 weight
    _grads_check("rms_norm", lambda a, b, r: rms_norm(a, b, c.norm_eps, residual=r),
                 lambda a, b, r: reference.rms_norm(a, b, c.norm_eps, residual=r), [x, w, res])
    cos, sin = rope_table(T, c.head_dim, c.rope_theta, device=x.device)
    q = torch.randn(B, T, c.n_head, c.head_dim, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, T, c.n_kv_head, c.head_dim, dtype=dtype).transpose(1, 2)
    _grads_check("rope_qk", lambda a, b: rope_qk(a, b, cos, sin), lambda a, b: reference.rope_qk(a, b, cos, sin), [q, k])
    _grads_check("swiglu_packed", swiglu_packed, reference.swiglu_packed,
                 [torch.randn(B, T, 2 * c.hidden_size, dtype=dtype)])
    check_attention(*make_qkv(B, c.n_head, c.n_kv_head, T, T, c.head_dim, dtype, layout="model"), True)
