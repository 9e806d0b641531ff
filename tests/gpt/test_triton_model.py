"""The model on the Triton kernels (Triton's interpreter on CPU) against the PyTorch path.

Tolerance rule of kernels/testing.py: the Triton model's error against the float64 PyTorch model
must be at most 2x (logits, loss) / 3x (gradients) the error of the fp32 PyTorch model.
"""
import copy

import pytest
import torch

from gpt import GPT, GPTConfig
from kernels._runtime import triton_unavailable_reason
from kernels.testing import FWD_FACTOR, GRAD_FACTOR, assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(triton_unavailable_reason(DEVICE) is not None,
                                reason=f"{triton_unavailable_reason(DEVICE)}")


def make(kernels, dtype, base):
    return copy.deepcopy(base).use_kernels(kernels).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_triton_model_matches_torch_model(n_kv_head):
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=53, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64, block_size=32))
    idx = torch.randint(0, 53, (2, 19), device=DEVICE)
    results = {}
    for name, kernels, dtype in (("triton", "triton", torch.float32), ("torch32", "torch", torch.float32),
                                 ("torch64", "torch", torch.float64)):
        m = make(kernels, dtype, base)
        logits, loss = m(idx, idx)
        loss.backward()
        results[name] = (logits, loss, {n: p.grad for n, p in m.named_parameters()})
    tri, t32, t64 = results["triton"], results["torch32"], results["torch64"]
    assert_close_to_reference("logits", tri[0], t64[0], t32[0], FWD_FACTOR, torch.float32)
    assert_close_to_reference("loss", tri[1].reshape(1), t64[1].reshape(1), t32[1].reshape(1), FWD_FACTOR,
                              torch.float32)
    for n in tri[2]:
        assert_close_to_reference(f"grad {n}", tri[2][n], t64[2][n], t32[2][n], GRAD_FACTOR, torch.float32)


@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["MHA", "MQA"])
def test_triton_kv_cache_generation_matches_torch(n_kv_head):
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=53, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64, block_size=16)).eval()
    idx = torch.randint(0, 53, (1, 5), device=DEVICE)
    tri = make("triton", torch.float32, base).generate(idx, 20, temperature=0)   # crosses block_size
    ref = make("torch", torch.float32, base).generate(idx, 20, temperature=0)
    assert torch.equal(tri, ref)
