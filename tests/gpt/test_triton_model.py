"""The model on the Triton kernels against the PyTorch path, on the `device` fixture (a CUDA GPU, or the
CPU with Triton's interpreter).

Tolerance rule of kernels/testing.py: the Triton model's error against the float64 PyTorch model must be
at most 2x (logits, loss) / 3x (gradients) the error of the PyTorch model in the same dtype. fp32 runs
everywhere (on a GPU its attention takes SDPA, as the model does for fp32); on a GPU, bf16 weights run the
Triton flash attention too.
"""
import copy

import pytest
import torch

from gpt import GPT, GPTConfig
from kernels._runtime import triton_unavailable_reason
from kernels.testing import FWD_FACTOR, GRAD_FACTOR, assert_close_to_reference

pytestmark = [pytest.mark.usefixtures("device"),
              pytest.mark.skipif(triton_unavailable_reason("cuda" if torch.cuda.is_available() else "cpu") is not None,
                                 reason="Triton cannot run here")]
DTYPES = [torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def make(kernels, dtype, base, device):
    return copy.deepcopy(base).use_kernels(kernels).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_triton_model_matches_torch_model(n_kv_head, dtype, device):
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=53, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64, block_size=32))
    idx = torch.randint(0, 53, (2, 19), device=device)
    results = {}
    for name, kernels, run_dtype in (("triton", "triton", dtype), ("torch_same", "torch", dtype),
                                     ("torch64", "torch", torch.float64)):
        m = make(kernels, run_dtype, base, device)
        logits, loss = m(idx, idx)
        loss.backward()
        results[name] = (logits, loss, {n: p.grad for n, p in m.named_parameters()})
    tri, same, t64 = results["triton"], results["torch_same"], results["torch64"]
    assert_close_to_reference("logits", tri[0], t64[0], same[0], FWD_FACTOR, dtype)
    # The loss is reduced in fp32 whatever the model's dtype (the model upcasts the logits).
    assert_close_to_reference("loss", tri[1].reshape(1), t64[1].reshape(1), same[1].reshape(1), FWD_FACTOR,
                              torch.float32)
    for n in tri[2]:
        assert_close_to_reference(f"grad {n}", tri[2][n], t64[2][n], same[2][n], GRAD_FACTOR, dtype)


@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["MHA", "MQA"])
def test_triton_kv_cache_generation_matches_torch(n_kv_head, device):
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=53, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64, block_size=16)).eval()
    idx = torch.randint(0, 53, (1, 5), device=device)
    tri = make("triton", torch.float32, base, device).generate(idx, 20, temperature=0)   # crosses block_size
    ref = make("torch", torch.float32, base, device).generate(idx, 20, temperature=0)
    assert torch.equal(tri, ref)


@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["MHA", "MQA"])
def test_triton_static_cache_decoding_matches_torch(n_kv_head, device):
    """The static-shape decoder (gpt/generation/compiled.py) on the Triton kernels, tritongpt::decode_attention
    included, against the eager PyTorch decoder, past block_size at batch 2. On a GPU it is compiled (CUDA
    graphs); under the interpreter the same functions run eagerly."""
    from gpt.generation import CompiledDecoder, SamplingConfig
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=53, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64, block_size=16)).eval()
    idx = torch.randint(0, 53, (2, 5), device=device)
    ref = make("torch", torch.float32, base, device).generate(idx, 20, temperature=0)
    dec = CompiledDecoder(make("triton", torch.float32, base, device), idx, SamplingConfig(temperature=0),
                          compile=device.type == "cuda")
    with torch.no_grad():
        tri = torch.cat([idx] + [dec.step() for _ in range(20)], dim=1)
    assert torch.equal(tri, ref)
