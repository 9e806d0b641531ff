import pytest
import torch

from gpt import GPT, GPTConfig
from train.optim import MuonAdamW, muon_groups, orthogonalize

# Keller Jordan's quintic Newton-Schulz is tuned to land every singular value of a matrix whose
# singular values are not tiny in about [0.7, 1.2] after five bf16 steps (not exactly 1); the bounds
# below leave a little room for bf16 rounding around that design range.
SV_LOW, SV_HIGH = 0.6, 1.25


@pytest.mark.parametrize("shape", [(64, 192), (192, 64), (100, 37)])
def test_orthogonalize_gives_the_polar_factor_approximately(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g).float()
    assert o.shape == g.shape and o.dtype == g.dtype
    s = torch.linalg.svdvals(o)
    assert SV_LOW < s.min() and s.max() < SV_HIGH, (s.min(), s.max())
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cosine = (o * polar).sum() / (o.norm() * polar.norm())
    assert cosine > 0.97, cosine  # measured 0.986-0.988 on these shapes


def small_model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**dict(dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=16, vocab_size=50), **kw)))


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_groups_cover_every_parameter_once(mlp):
    model = small_model(mlp=mlp)
    groups = muon_groups(model, 0.02, 1e-3, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert len(groups[0]["params"]) == 4 * model.config.n_layer and groups[0]["muon"]
    assert model.wte.weight in groups[1]["params"]  # the tied embedding/head keeps AdamW
    assert all(p.dim() == 1 for p in groups[2]["params"]) and groups[2]["weight_decay"] == 0


def test_muon_orthogonalizes_each_packed_matrix_separately():
    """q, k, v (and gate, up) are separate matrices packed in one weight: each part's update must have
    singular values near 1 (times sqrt(rows/cols) when tall) even when one part's gradient is 1000x
    smaller than the others. Orthogonalizing the packed weight as one would shrink the small part.
    The median singular value is checked: a square Gaussian gradient has a few near-zero singular
    values that five Newton-Schulz steps cannot lift (and Muon does not need to)."""
    model = small_model()
    c = model.config
    opt = MuonAdamW(muon_groups(model, matrix_lr=1.0, adam_lr=0.0, weight_decay=0.0), lr=0.0, momentum=0.0)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    before = {p: p.detach().clone() for p in (attn.c_attn.weight, mlp.c_fc.weight)}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    q_rows = c.n_head * c.head_dim
    attn.c_attn.weight.grad[q_rows:q_rows + c.n_kv_head * c.head_dim] *= 1e-3  # the k part
    opt.step()
    parts = {attn.c_attn.weight: [q_rows, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim],
             mlp.c_fc.weight: [c.hidden_size, c.hidden_size]}
    for p, sizes in parts.items():
        update = before[p] - p.detach()
        for part in update.split(sizes):
            scale = max(1.0, part.shape[0] / part.shape[1]) ** 0.5
            s = torch.linalg.svdvals(part) / scale
            assert SV_LOW < s.median() and s.max() < SV_HIGH, (tuple(part.shape), s.median(), s.max())


def test_adamw_groups_match_torch_adamw():
    a, b = small_model(), small_model()
    groups = lambda m: [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                        {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    ours = MuonAdamW(groups(a), lr=1e-2, betas=(0.9, 0.99))
    ref = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.99), foreach=False)
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(10):
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x, x)[1].backward()
            opt.step()
    # The same update with the bias corrections applied in another order: a few fp32 ulps per step.
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
