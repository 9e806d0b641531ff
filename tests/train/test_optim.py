import pytest
import torch

from bench.muon_ns import orthogonalize_unfused, recipe_stacks
from gpt import GPT, GPTConfig
from train.optim import NS_COEFFS, MuonAdamW, muon_groups, orthogonalize

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
    assert cosine > 0.97, cosine  # measured 0.985-0.986 on these shapes


# The matrix shapes Muon orthogonalizes each step in the CPU recipe (rows, cols): number of them.
RECIPE = recipe_stacks("configs/shakespeare_cpu.toml")


def newton_schulz_fp64(g: torch.Tensor, steps: int = 5, round_iterate: bool = False) -> torch.Tensor:
    """orthogonalize's iteration in fp64 from the same bf16 input. round_iterate: round x to bf16
    after the normalization and after every step, the one rounding a step that any bf16
    implementation makes (it stores x in bf16), and nothing else."""
    a, b, c = NS_COEFFS
    rnd = (lambda t: t.bfloat16().double()) if round_iterate else (lambda t: t)
    x = g.to(torch.bfloat16).double()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = rnd(x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7))
    for _ in range(steps):
        gram = x @ x.mT
        x = rnd(a * x + (b * gram + c * gram @ gram) @ x)
    return x.mT if tall else x


@pytest.fixture(scope="module")
def recipe_runs():
    """Four Gaussian matrices of each recipe shape: fp64 Newton-Schulz, the same with only its iterate
    rounded to bf16 each step, the unfused bf16 steps (eight roundings a step) and orthogonalize
    (three: gram, b gram + c gram^2, a x + B x, each one fused GEMM)."""
    gen = torch.Generator().manual_seed(0)
    runs = []
    for rows, cols in RECIPE:
        g = torch.randn((4, rows, cols), generator=gen)
        runs.append({"shape": (rows, cols), "fp64": newton_schulz_fp64(g),
                     "iterate": newton_schulz_fp64(g, round_iterate=True),
                     "unfused": orthogonalize_unfused(g).double(), "fused": orthogonalize(g).double()})
    return runs


def test_orthogonalize_is_no_further_from_fp64_than_the_unfused_steps(recipe_runs):
    """Fusing the scalar terms into the GEMMs rounds fewer intermediates to bf16, so the result may
    not be further from fp64 Newton-Schulz than the unfused steps' (relative Frobenius error of each
    matrix; measured with seeds 0-3: 0.011-0.012 fused, 0.023-0.027 unfused, 0.005-0.0075 with only
    the iterate rounded, a fused / unfused ratio of 0.43-0.50). 1.25x leaves room for rounding luck."""
    for run in recipe_runs:
        ref = run["fp64"]
        err = {k: ((run[k] - ref).flatten(-2).norm(dim=-1) / ref.flatten(-2).norm(dim=-1)).max().item()
               for k in ("fused", "unfused", "iterate")}
        assert err["fused"] <= 1.25 * err["unfused"], (run["shape"], err)
        assert err["fused"] < 0.05, (run["shape"], err)


def test_orthogonalize_matches_the_unfused_steps_up_to_bf16_rounding(recipe_runs):
    """The bound comes from the iteration itself: rounding only the iterate to bf16 once a step (in
    fp64 otherwise) moves the result by e1 (largest entry), which is bf16's unit roundoff grown
    through the remaining steps on these very matrices (the iteration multiplies small singular
    values, and errors along them, by about a = 3.44 a step). Each bf16 rounding of an intermediate
    of about the iterate's size costs about as much; the unfused steps make 8 a step (gram, b gram,
    c gram, c gram @ gram, their sum, @ x, a x, the sum) and the fused 3, so the two may differ by
    (8 + 3) e1 (a worst case: the roundings do not all line up). Measured with seeds 0-3: max |diff|
    0.009-0.012, 4-8 e1."""
    for run in recipe_runs:
        e1 = (run["iterate"] - run["fp64"]).abs().max().item()
        diff = (run["fused"] - run["unfused"]).abs().max().item()
        assert diff <= (8 + 3) * e1, (run["shape"], diff, e1)


@pytest.mark.parametrize("shape", list(RECIPE))
def test_a_sub_stack_orthogonalizes_bit_for_bit_like_the_whole_stack(shape):
    """_orthogonalize_shared gives each rank a run of ceil(n / world) matrices of a stack: the ranks'
    results must be exactly the rows of the one-process result (same kernels per matrix whatever the
    batch size), and a lone matrix (2-D) or a stack with more leading dimensions must match too."""
    n = RECIPE[shape]
    stack = torch.randn((n, *shape), generator=torch.Generator().manual_seed(1))
    whole = orthogonalize(stack)
    for world in (2, 3, 5):
        per = -(-n // world)
        for r in range(world):
            part = stack[r * per:(r + 1) * per]
            if len(part):
                assert torch.equal(orthogonalize(part), whole[r * per:(r + 1) * per]), (world, r)
    assert torch.equal(orthogonalize(stack[n - 1]), whole[n - 1])
    if n % 2 == 0:
        assert torch.equal(orthogonalize(stack.view(2, n // 2, *shape)), whole.view(2, n // 2, *shape))


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
