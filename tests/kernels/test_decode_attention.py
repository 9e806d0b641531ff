"""kernels.decode_attention (a preallocated KV cache masked by per-row lengths) against kernels.reference.

Same accuracy rule as tests/kernels/test_attention.py (kernels/testing.py): the error against the float64
reference is at most 2x PyTorch's own error in the same dtype + 1 ulp. The same-dtype baseline is
`reference.attention` on each row's valid keys, k[b, :, :kv_len[b]], in the input dtype (the baseline the
attention tests use: matmuls in that dtype); the float64 truth is `reference.decode_attention`, checked here
to equal that per-row attention in float64.
"""
from __future__ import annotations

import pytest
import torch

import kernels
import kernels._attention as attn
from kernels import reference
from kernels._runtime import INTERPRETER_NUM_SMS
from kernels.testing import FWD_FACTOR, assert_close_to_reference

from .test_attention import LOGIC_DTYPE

N_LAYER, LAYER = 3, 1
SMALL_BLOCKS = attn.Config(16, 16, 4, 1)  # 16-key blocks: several blocks and splits in a short cache


def make_cache(B, H, Hkv, Tq, L, D, dtype, layout="bhld"):
    """q (B, H, Tq, D) as a transposed (B, Tq, H, D) view, and k/v = cache[LAYER] of a 5-D cache:
    'bhld' (n_layer, B, Hkv, L, D), or 'blhd' (n_layer, B, L, Hkv, D) viewed as (B, Hkv, L, D)."""
    q = torch.randn(B, Tq, H, D).transpose(1, 2).to(dtype)
    if layout == "bhld":
        cache_k, cache_v = (torch.randn(N_LAYER, B, Hkv, L, D).to(dtype) for _ in range(2))
        return q, cache_k[LAYER], cache_v[LAYER]
    cache_k, cache_v = (torch.randn(N_LAYER, B, L, Hkv, D).to(dtype) for _ in range(2))
    return q, cache_k[LAYER].transpose(1, 2), cache_v[LAYER].transpose(1, 2)


def per_row_attention(q, k, v, kv_len, scale=None):
    """reference.attention(causal=True) on each batch row's first kv_len[b] keys, in the inputs' dtype."""
    return torch.cat([reference.attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], True, scale)
                      for b, n in enumerate(kv_len.tolist())])


def check_decode(q, k, v, kv_len, scale=None, **fwd_kwargs):
    """Output against the float64 reference, with garbage in the cache past kv_len: NaN keys, huge and
    infinite values (written in place, so the cache views keep their strides). The same-dtype baseline never
    reads it, and one garbage value reaching the result would break the bound (or make it non-finite)."""
    past = torch.arange(k.shape[2], device=k.device).view(1, 1, -1, 1) >= kv_len.view(-1, 1, 1, 1)
    k.masked_fill_(past, float("nan"))
    v.masked_fill_(past, torch.finfo(v.dtype).max)
    v[..., ::3, :].masked_fill_(past[..., ::3, :], float("inf"))
    originals = [t.clone() for t in (q, k, v, kv_len)]
    if fwd_kwargs:
        out = attn.attention_fwd(q, k, v, True, scale, kv_len=kv_len, **fwd_kwargs)[0]
    else:
        out = kernels.decode_attention(q, k, v, kv_len, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    ref64 = reference.decode_attention(q.double(), k.double(), v.double(), kv_len, scale)
    torch.testing.assert_close(ref64, per_row_attention(q.double(), k.double(), v.double(), kv_len, scale),
                               rtol=1e-12, atol=1e-12)
    assert_close_to_reference("out", out, ref64, per_row_attention(q, k, v, kv_len, scale), FWD_FACTOR)
    for before, after in zip(originals, (q, k, v, kv_len)):  # the inputs are left unchanged
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)


# kv_len per row: empty, one key, the whole cache, and 45 (off the 16- and 64-key blocks; with 4 splits of 32
# keys over L = 100 it leaves two whole splits past kv_len).
KV_LEN = [0, 1, 100, 45]
L = 100


@pytest.mark.parametrize("H,Hkv,Tq,dtype,kv_dtype,layout", [
    (4, 2, 1, torch.float16, torch.int64, "bhld"),     # GQA, one query: the decode step
    (2, 2, 1, LOGIC_DTYPE, torch.int32, "blhd"),       # MHA
    (4, 2, 2, LOGIC_DTYPE, torch.int32, "bhld"),       # two queries: query 0 of a 1-key row sees nothing
    (2, 2, 2, torch.bfloat16, torch.int64, "blhd"),
])
@pytest.mark.parametrize("splits", ["one", "four"])
def test_matches_reference(H, Hkv, Tq, dtype, kv_dtype, layout, splits):
    """splits='one': the public op with the launcher's own choice (one split at L = 100); 'four': 16-key
    blocks in 4 splits of 32 keys, so the combine kernel merges partials, some of them empty (-inf)."""
    q, k, v = make_cache(len(KV_LEN), H, Hkv, Tq, L, 32, dtype, layout)
    kv_len = torch.tensor(KV_LEN, dtype=kv_dtype)
    if splits == "one":
        assert attn._num_splits(len(KV_LEN) * Hkv, L, attn.DECODE_CONFIGS[32, 16].block_n, INTERPRETER_NUM_SMS)[0] == 1
        check_decode(q, k, v, kv_len)
    else:
        check_decode(q, k, v, kv_len, config=SMALL_BLOCKS, split_kv=4)


def test_one_split_small_blocks_and_scale():
    """One split over many 16-key blocks (the unmasked hot loop and the masked tail), a custom scale,
    head dim 16."""
    q, k, v = make_cache(3, 8, 2, 1, 70, 16, LOGIC_DTYPE)
    check_decode(q, k, v, torch.tensor([70, 45, 16], dtype=torch.int32), 0.3, config=SMALL_BLOCKS, split_kv=1)


def test_matches_attention_at_full_length():
    """kv_len = L everywhere is plain causal attention over the whole cache, with the same splits."""
    q, k, v = make_cache(2, 4, 2, 2, 100, 32, torch.float16)
    out = kernels.decode_attention(q, k, v, torch.full((2,), 100))
    torch.testing.assert_close(out, attn.attention(q, k, v), rtol=0, atol=0)


def test_lengths_past_the_cache_are_clamped():
    """kv_len cannot be checked on the host: values outside [0, L] are clamped on the device, like the reference."""
    q, k, v = make_cache(2, 4, 2, 1, 40, 16, LOGIC_DTYPE)
    out = kernels.decode_attention(q, k, v, torch.tensor([-3, 1000]))
    want = kernels.decode_attention(q, k, v, torch.tensor([0, 40]))
    assert torch.equal(out, want) and (out[0] == 0).all()
    torch.testing.assert_close(reference.decode_attention(q, k, v, torch.tensor([-3, 1000])),
                               reference.decode_attention(q, k, v, torch.tensor([0, 40])))


def test_launch_depends_on_shapes_only(monkeypatch):
    """kv_len is never read on the host (so a captured CUDA graph serves any lengths): the same decode grid
    for any kv_len, and no integer tensor becomes a Python number during the call."""
    grids = []
    kernel = attn._attn_decode_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    q, k, v = make_cache(2, 4, 2, 1, 300, 16, LOGIC_DTYPE)
    monkeypatch.setattr(attn, "_attn_decode_kernel", Recorder())
    for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def no_host_read(self, *args, _original=original, _name=name):
            assert self.is_floating_point(), f"an integer tensor was read on the host ({_name})"
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    for lengths in ([0, 0], [300, 7], [1, 299]):
        kernels.decode_attention(q, k, v, torch.tensor(lengths))
    monkeypatch.undo()
    assert len(grids) == 3 and grids[0] == grids[1] == grids[2]


def test_torch_compile_fullgraph():
    """The op is opaque to torch.compile(fullgraph=True) (fake registration); compiled == eager."""
    torch._dynamo.reset()
    q = torch.randn(2, 4, 1, 16, dtype=LOGIC_DTYPE)
    cache_k, cache_v = (torch.randn(N_LAYER, 2, 2, 40, 16, dtype=LOGIC_DTYPE) for _ in range(2))

    def step(q, cache_k, cache_v, kv_len):
        return kernels.decode_attention(q * 2, cache_k[LAYER], cache_v[LAYER], kv_len + 1) + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    kv_len = torch.tensor([5, 39], dtype=torch.int32)
    assert torch.equal(compiled(q, cache_k, cache_v, kv_len), step(q, cache_k, cache_v, kv_len))
    explanation = torch._dynamo.explain(step)(q, cache_k, cache_v, kv_len)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_opcheck():
    q, k, v = make_cache(2, 2, 1, 1, 7, 16, LOGIC_DTYPE)
    torch.library.opcheck(torch.ops.tritongpt.decode_attention.default,
                          (q, k, v, torch.tensor([3, 7], dtype=torch.int32), 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_inference_only():
    q, k, v = make_cache(1, 2, 1, 1, 8, 16, LOGIC_DTYPE)
    out = kernels.decode_attention(q.requires_grad_(), k, v, torch.tensor([4]))
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


def _inputs(B=2, H=4, Hkv=2, Tq=1, kv_len=None):
    q, k, v = (torch.randn(shape, dtype=LOGIC_DTYPE) for shape in ((B, H, Tq, 16), (B, Hkv, 8, 16), (B, Hkv, 8, 16)))
    return q, k, v, torch.tensor([3] * B) if kv_len is None else kv_len


SHAPE = r"kv_len must have shape \(B,\) = \(2,\) \(valid keys per batch row\), got "


@pytest.mark.parametrize("make,error,match", [
    (lambda: _inputs(kv_len=torch.tensor([3, 3, 3])), ValueError, SHAPE + r"\(3,\)$"),
    (lambda: _inputs(kv_len=torch.tensor([[3], [3]])), ValueError, SHAPE + r"\(2, 1\)$"),
    (lambda: _inputs(kv_len=torch.tensor(3)), ValueError, SHAPE + r"\(\)$"),
    (lambda: _inputs(kv_len=torch.tensor([3.0, 3.0])), ValueError, "kv_len must be int32 or int64, got float32"),
    (lambda: _inputs(kv_len=[3, 3]), TypeError, "kv_len must be a torch.Tensor"),
    (lambda: _inputs(kv_len=torch.zeros(2, dtype=torch.int32, device="meta")), ValueError,
     "kv_len must be on q's device"),
    (lambda: _inputs(Tq=17), ValueError, "takes 1..16 queries"),
    (lambda: _inputs(H=32, Hkv=1, Tq=3), ValueError, r"at most 64 \(H // Hkv\) \* Tq rows"),
    (lambda: _inputs(H=3), ValueError, "multiple of key/value heads"),
])
def test_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        kernels.decode_attention(*make())


def test_compile_specs_cover_the_kv_len_variant():
    """kernels.report compiles decode_attention's kernel variant: quick, with int32 and int64 kv_len; full, for
    every causal decode config in both dtypes; the plain decode specs pass no kv_len (a constexpr None)."""
    def variants(quick):
        return [s for s in attn.compile_specs(quick=quick) if s.kernel == "_attn_decode_kernel"]
    quick = [s for s in variants(True) if s.constexprs["HAS_KV_LEN"]]
    assert {s.signature["KV_LEN"] for s in quick} == {"*i32", "*i64"}
    full = variants(False)
    key = lambda s: (s.constexprs["HEAD_DIM"], s.constexprs["BLOCK_M"], s.signature["Q"])
    plain = {key(s) for s in full if not s.constexprs["HAS_KV_LEN"] and s.constexprs["IS_CAUSAL"]}
    for kv_dt in ("*i32", "*i64"):
        assert {key(s) for s in full if s.constexprs["HAS_KV_LEN"] and s.signature["KV_LEN"] == kv_dt} == plain
    assert all(s.constexprs["IS_CAUSAL"] for s in full if s.constexprs["HAS_KV_LEN"])
    assert all(s.constexprs["KV_LEN"] is None for s in full if not s.constexprs["HAS_KV_LEN"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_graph_replay_with_new_lengths(dtype):
    """Captured once, replayed after kv_len and the cache change in place: the graph reads the new lengths."""
    q, k, v = make_cache(4, 16, 2, 1, 4096, 128, dtype)
    kv_len = torch.tensor([1, 4096, 1000, 0], device="cuda")
    kernels.decode_attention(q, k, v, kv_len)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.decode_attention(q, k, v, kv_len)
    for lengths in ([1, 4096, 1000, 0], [3000, 17, 0, 4095]):
        kv_len.copy_(torch.tensor(lengths))
        k.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_reference("out", out, reference.decode_attention(q.double(), k.double(), v.double(), kv_len),
                                  per_row_attention(q, k, v, kv_len), FWD_FACTOR)
