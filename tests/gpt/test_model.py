import copy

import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig
from gpt.generation import KVCache

pytestmark = pytest.mark.usefixtures("device")  # CUDA when present, else the CPU (tests/conftest.py)


def tiny_config(**kw):
    base = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("mlp,norm", [("swiglu", "rms"), ("gelu", "layer")])
def test_causality(n_kv_head, mlp, norm):
    model = GPT(tiny_config(n_kv_head=n_kv_head, mlp=mlp, norm=norm)).eval()
    idx = torch.randint(0, 64, (2, 20))
    base, _ = model(idx)
    for t in (0, 7, 18):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 64
        out, _ = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position <= {t} changed"
        assert not torch.allclose(out[:, t + 1], base[:, t + 1]), "the changed position itself must change"


def test_gqa_with_equal_heads_is_plain_multi_head_attention():
    model = GPT(tiny_config(n_kv_head=4)).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 32)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    from gpt import ops
    out = attn(x, cos, sin, ops.select("torch", "cpu"))
    # Independent MHA: per-head softmax(q k^T / sqrt(d)) v with RoPE'd q, k, written out by hand.
    q, k, v = attn.c_attn(x).split(32, dim=-1)
    q = q.view(2, 10, 4, 8).transpose(1, 2)
    k = k.view(2, 10, 4, 8).transpose(1, 2)
    v = v.view(2, 10, 4, 8).transpose(1, 2)

    def rot(t):
        t1, t2 = t[..., :4], t[..., 4:]
        return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), -1)
    q, k = rot(q), rot(k)
    s = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    s = s.masked_fill(torch.triu(torch.ones(10, 10, dtype=torch.bool), 1), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(out, attn.c_proj(y), rtol=1e-5, atol=1e-5)


def test_gqa_matches_mha_with_repeated_kv_heads():
    """A GQA model equals an MHA model whose K/V projections are the GQA ones repeated per group."""
    gqa = GPT(tiny_config(n_kv_head=2)).eval()
    mha = GPT(tiny_config(n_kv_head=4)).eval()
    sd = copy.deepcopy(gqa.state_dict())
    for i in range(2):
        w = sd[f"blocks.{i}.attn.c_attn.weight"]
        q, k, v = w.split([32, 16, 16], dim=0)
        rep = lambda t: t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)  # noqa: E731
        sd[f"blocks.{i}.attn.c_attn.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    idx = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=1e-5, atol=1e-5)


def test_kv_cache_has_kv_heads():
    model = GPT(tiny_config(n_kv_head=1))
    cache = KVCache.for_model(model, batch=3)
    assert cache.k.shape == (2, 3, 1, 32, 8) and cache.v.shape == cache.k.shape


def test_weight_tying_shares_one_tensor():
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    untied = GPT(tiny_config(tie_weights=False))
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()


def test_loss_ignores_minus_one():
    model = GPT(tiny_config())
    idx = torch.randint(0, 64, (2, 8))
    tgt = torch.randint(0, 64, (2, 8))
    masked = tgt.clone()
    masked[:, :4] = -1
    logits, loss = model(idx, masked)
    want = F.cross_entropy(logits[:, 4:].reshape(-1, 64), tgt[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, want)


def test_residual_projection_init_scaled_for_depth():
    model = GPT(tiny_config(n_layer=8, n_embd=64, vocab_size=32))
    std_proj = model.blocks[0].mlp.c_proj.weight.std().item()
    std_fc = model.blocks[0].mlp.c_fc.weight.std().item()
    assert std_proj == pytest.approx(0.02 / 4, rel=0.15) and std_fc == pytest.approx(0.02, rel=0.15)


def test_input_errors_are_clear():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="exceeds block_size=32; crop the input"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="must be \\(batch, time\\)"):
        model(torch.zeros(33, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = GPT(tiny_config(dropout=0.0))
    b = GPT(tiny_config(), gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 64, (2, 16))
    a(idx, idx)[1].backward()
    b(idx, idx)[1].backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=2, n_embd=64, n_head=4, n_kv_head=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 64, (4, 32))
    x, y = idx[:, :-1], idx[:, 1:]
    for step in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Random tokens: log(64) = 4.16 at the start; memorising 124 targets must get far below that.
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after 150 steps"


def test_torch_compile_forward_backward():
    model = GPT(tiny_config())
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, 64, (2, 16))
    logits, loss = compiled(idx, idx)
    loss.backward()
    ref_logits, _ = model(idx, idx)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert all(p.grad is not None for p in model.parameters())
