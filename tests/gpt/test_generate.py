import pytest
import torch

from gpt import GPT, GPTConfig
from gpt.generation import apply_top_k, apply_top_p, generate, generate_stream, sample_next

pytestmark = pytest.mark.usefixtures("device")  # CUDA when present, else the CPU (tests/conftest.py)


def model_for(n_kv_head, block_size=24, **kw):
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32, block_size=block_size, **kw)
    return GPT(cfg).eval()


def greedy_by_recompute(model, idx, n):
    """Reference: the window schedule of gpt/generation/eager.py, recomputing the window at every step."""
    block, keep = model.config.block_size, model.config.block_size // 2
    window = idx[:, -block:]
    out = idx
    for _ in range(n):
        if window.shape[1] > block:
            window = window[:, -keep:]
        logits, _ = model(window)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        window = torch.cat((window, nxt), 1)
        out = torch.cat((out, nxt), 1)
    return out


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_cached_greedy_equals_recompute_within_block(n_kv_head):
    model = model_for(n_kv_head)
    idx = torch.randint(0, 50, (2, 5))
    cached = model.generate(idx, 19, temperature=0)          # fills the cache exactly to block_size
    assert torch.equal(cached, greedy_by_recompute(model, idx, 19))


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_generation_past_block_size_follows_the_window_strategy(n_kv_head):
    model = model_for(n_kv_head, block_size=16)
    idx = torch.randint(0, 50, (1, 30))                     # longer than block: cropped
    out = model.generate(idx, 40, temperature=0)
    assert out.shape == (1, 70)
    assert torch.equal(out, greedy_by_recompute(model, idx, 40))
    assert torch.equal(out, model.generate(idx, 40, temperature=0, use_cache=False))


def test_generation_under_bf16_autocast_runs_and_is_close():
    model = model_for(2)
    idx = torch.randint(0, 50, (1, 4))
    out = model.generate(idx, 10, temperature=0, dtype=torch.bfloat16)
    assert out.shape == (1, 14) and out.dtype == torch.long


def test_top_k_never_samples_outside_kept_set():
    logits = torch.log(torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits.expand(500, 5), 1.0, top_k=2, generator=g) for _ in range(4)])
    assert set(draws.unique().tolist()) == {0, 1}


def test_top_p_never_samples_outside_nucleus():
    # Cumulative 0.5, 0.8, 0.95, 1.0: p=0.75 keeps the first two (0.5 < 0.75 <= 0.8).
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    masked = apply_top_p(probs.log(), 0.75)
    assert torch.isinf(masked[0, 2:]).all() and torch.isfinite(masked[0, :2]).all()
    g = torch.Generator().manual_seed(0)
    draws = sample_next(probs.log().expand(2000, 4), 1.0, top_p=0.75, generator=g)
    assert set(draws.unique().tolist()) == {0, 1}
    # The top token is always kept, even for tiny p.
    assert torch.isfinite(apply_top_p(probs.log(), 1e-6)[0, 0])


def test_top_k_keeps_exactly_k():
    logits = torch.randn(3, 100)
    kept = torch.isfinite(apply_top_k(logits, 7)).sum(-1)
    assert kept.tolist() == [7, 7, 7]


def test_same_seed_same_output_and_greedy_is_deterministic():
    model = model_for(2)
    idx = torch.randint(0, 50, (2, 3))
    a = model.generate(idx, 15, temperature=1.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = model.generate(idx, 15, temperature=1.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c = model.generate(idx, 15, temperature=1.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample_next(torch.randn(1, 5), -1.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        apply_top_p(torch.randn(1, 5), 0.0)
    with pytest.raises(ValueError, match="non-empty prompt"):
        generate(model_for(2), torch.zeros(1, 0, dtype=torch.long), 3)


def test_bf16_weights_generation_matches_bf16_autocast_closely():
    model = model_for(2)
    idx = torch.randint(0, 50, (1, 6))
    logits32, _ = model(idx)
    model.cast_weights_(torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16 and model.rope_cos.dtype == torch.float32
    logits16, _ = model(idx)
    assert logits16.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: logits agree to a few percent of their spread.
    assert (logits16.float() - logits32).abs().max() < 0.05 * logits32.abs().max()
    out = model.generate(idx, 8, temperature=0)
    assert out.shape == (1, 14)


def test_autocast_does_not_leak_between_streamed_tokens():
    model = model_for(2)
    stream = generate_stream(model, torch.randint(0, 50, (1, 3)), 3, dtype=torch.bfloat16)
    next(stream)
    assert not torch.is_autocast_enabled(model.wte.weight.device.type)
    list(stream)


def test_existing_call_sites_keep_working_positionally_and_by_keyword():
    """model.generate / generate_stream keep their old positional order; the new settings are keyword-only."""
    model = model_for(2)
    idx = torch.randint(0, 50, (2, 3))
    a = model.generate(idx, 6, 0.0, None, None, None, True, None)
    b = model.generate(idx, 6, temperature=0, use_cache=False, dtype=torch.float32)
    assert torch.equal(a, b) and a.shape == (2, 9)
    steps = list(generate_stream(model, idx, 4, 0.0, None, None, None, True, None))
    assert len(steps) == 4 and all(s.shape == (2, 1) for s in steps)
    # Defaults are off: min-p 0, penalties neutral, no end-of-text token.
    c = model.generate(idx, 6, temperature=0, min_p=0.0, repetition_penalty=1.0, frequency_penalty=0.0,
                       presence_penalty=0.0, eot_id=None)
    assert torch.equal(a, c)
