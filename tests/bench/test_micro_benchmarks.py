"""pytest-benchmark micro-benchmarks of the CPU paths. Deselected in the default test run (the `micro`
mark); run them with

    pytest tests/bench -m micro --benchmark-only
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytestmark = pytest.mark.micro

from gpt import create_model
from gpt.generation import KVCache
from gpt.model import rope_table
from gpt.ops import sdpa_attention
from kernels import reference

ROWS, DIM = 1024, 1024
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_rms_norm(benchmark, dtype):
    x = torch.randn(ROWS, DIM, dtype=dtype)
    w = torch.ones(DIM, dtype=dtype)
    benchmark(reference.rms_norm, x, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_swiglu(benchmark, dtype):
    gate, up = torch.randn(ROWS, DIM, dtype=dtype), torch.randn(ROWS, DIM, dtype=dtype)
    benchmark(reference.swiglu, gate, up)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_rope(benchmark, dtype):
    x = torch.randn(1, 16, 256, 64, dtype=dtype)
    cos, sin = rope_table(256, 64, 10000.0)
    benchmark(reference.rope, x, cos, sin)


@pytest.mark.parametrize("provider", ["reference", "sdpa"])
def test_causal_attention(benchmark, provider):
    q = torch.randn(1, 8, 256, 64)
    k, v = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
    fn = reference.attention if provider == "reference" else sdpa_attention
    benchmark(fn, q, k, v, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_model_forward_backward(benchmark, dtype):
    model = create_model("tiny", kernels="torch")
    idx = torch.randint(0, model.config.vocab_size, (2, 64))

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(idx, idx)
        loss.backward()
        model.zero_grad(set_to_none=True)

    benchmark(step)


def test_tiny_model_decode_step(benchmark):
    """One cached decode step (batch 1) at a 128-token context."""
    model = create_model("tiny", kernels="torch").eval()
    cache = KVCache.for_model(model, 1)
    with torch.no_grad():
        model.hidden_states(torch.randint(0, model.config.vocab_size, (1, 128)), cache=cache)
    token = torch.randint(0, model.config.vocab_size, (1, 1))

    @torch.no_grad()
    def step():
        cache.pos = 128  # overwrite the same position every call
        return model.lm_head(model.hidden_states(token, cache=cache)[:, -1])

    benchmark(step)
