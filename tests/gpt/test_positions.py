"""Per-row positions in the eager decoder (gpt/generation/cache.py, eager.py): prompts of different lengths in
one batch, each row at its own cache length and RoPE positions, padding never attended, past block_size row by
row, on the PyTorch ops and on the Triton kernels (the interpreter on a CPU)."""
import dataclasses

import pytest
import torch

from gpt import GPT, GPTConfig
from gpt.generation import Decoder, KVCache, SamplingConfig, generate, generate_completions
from kernels._runtime import triton_unavailable_reason

pytestmark = pytest.mark.usefixtures("device")  # CUDA when present, else the CPU (tests/conftest.py)


def tiny(n_kv_head=2, block_size=16, vocab=50, n_embd=32):
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=n_embd, block_size=block_size,
                    init_std=0.5)   # large weights: greedy text moves around instead of repeating one token
    return GPT(cfg).eval()


def prompts_of(lengths, vocab=50, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def padded(prompts, device, pad=0):
    idx = torch.full((len(prompts), max(map(len, prompts))), pad, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p)
    return idx.to(device), [len(p) for p in prompts]


def decode(model, idx, lengths, n, **kw):
    dec = Decoder(model, idx, SamplingConfig(temperature=0.0), lengths=lengths, **kw)
    with torch.no_grad():
        return torch.cat([dec.step() for _ in range(n)], dim=1)


# Lengths: one token, a few, exactly block_size, past it (cropped); 40 new tokens cross block_size in every row,
# each at its own step (two or three re-prefills per row).
LENGTHS = [3, 9, 1, 16, 21]


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_each_row_of_a_mixed_batch_decodes_as_its_prompt_alone(n_kv_head, device):
    model = tiny(n_kv_head).to(device)
    prompts = prompts_of(LENGTHS)
    idx, lengths = padded(prompts, device)
    batched = decode(model, idx, lengths, 40)
    for b, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p], device=device), 40, temperature=0)[0, len(p):]
        assert batched[b].tolist() == alone.tolist(), f"row {b} (prompt of {len(p)} tokens)"


def test_the_padding_is_never_attended(device):
    """Other padding ids, other tokens: the same text. And the recompute path (no cache) agrees."""
    model = tiny().to(device)
    prompts = prompts_of(LENGTHS)
    a = decode(model, *padded(prompts, device, pad=0), 30)
    b = decode(model, *padded(prompts, device, pad=49), 30)
    assert torch.equal(a, b)
    assert torch.equal(a, decode(model, *padded(prompts, device, pad=7), 30, use_cache=False))


def test_rows_of_one_length_take_the_single_position_path(monkeypatch, device):
    """No per-row tables, no masked decode attention, when every row has one length (the batch as before)."""
    model = tiny().to(device)
    calls = []
    monkeypatch.setattr(model, "ops", dataclasses.replace(model.ops, decode_attention=lambda *a, **k: calls.append(1)))
    idx = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(0)).to(device)
    out = decode(model, idx, None, 20)                    # past block_size: the rows re-prefill together
    assert not calls and out.shape == (3, 20)


def test_penalties_count_each_rows_own_prompt_not_the_padding(device):
    model = tiny().to(device)
    prompts = prompts_of([2, 7, 4])
    kw = dict(temperature=0.0, repetition_penalty=1.8, frequency_penalty=0.5, presence_penalty=0.3)
    idx, lengths = padded(prompts, device, pad=prompts[1][0])   # a pad id that occurs in row 1 only
    s = SamplingConfig(**kw)
    dec = Decoder(model, idx, s, lengths=lengths)
    with torch.no_grad():
        batched = torch.cat([dec.step() for _ in range(20)], dim=1)
    for b, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p], device=device), 20, **kw)[0, len(p):]
        assert batched[b].tolist() == alone.tolist(), b


def test_a_dropped_row_leaves_the_others_at_their_own_positions(device):
    model = tiny().to(device)
    prompts = prompts_of([4, 11, 2])
    idx, lengths = padded(prompts, device)
    full = decode(model, idx, lengths, 24)
    dec = Decoder(model, idx, SamplingConfig(temperature=0.0), lengths=lengths)
    got = {0: [], 1: [], 2: []}
    with torch.no_grad():
        for i in range(24):
            for r, t in zip(dec.rows.tolist(), dec.step()[:, 0].tolist()):
                got[r].append(t)
            if i == 5:
                dec.keep(torch.tensor([True, False, True], device=device))
    assert got[0] == full[0].tolist() and got[2] == full[2].tolist() and got[1] == full[1, :6].tolist()


def test_generate_completions_batches_prompts_of_any_lengths(monkeypatch, device):
    model = tiny().to(device)
    prompts = prompts_of([3, 8, 5, 1, 12])
    forwards = []
    forward = model.hidden_states

    def recording(idx, cache=None):
        forwards.append(tuple(idx.shape))
        return forward(idx, cache=cache)

    monkeypatch.setattr(model, "hidden_states", recording)
    batched = generate_completions(model, prompts, 4, temperature=0, batch_size=3)
    assert [f for f in forwards if f[1] > 1] == [(3, 8), (2, 12)]    # rows 0-2 then rows 3-4, one prefill each
    monkeypatch.setattr(model, "hidden_states", forward)
    alone = [generate_completions(model, [p], 4, temperature=0)[0].ids for p in prompts]
    assert [c.ids for c in batched] == alone


def test_the_cache_tracks_a_length_per_row(device):
    model = tiny().to(device)
    cache = KVCache.for_model(model, 3)
    idx, lengths = padded(prompts_of([2, 5, 3]), device)
    with torch.no_grad():
        model.hidden_states(idx, cache=cache.prefill(None, lengths))
        assert cache.lengths == [2, 5, 3]
        cache.hold([1])
        model.hidden_states(torch.zeros(3, 1, dtype=torch.long, device=device), cache=cache)
        assert cache.lengths == [3, 5, 4]                # the held row's placeholder is not counted
        with pytest.raises(ValueError, match="different lengths"):
            cache.pos
        cache.pos = 4
        assert cache.lengths == [4, 4, 4] and cache.k.shape[3] == model.config.block_size


def test_bad_lengths_are_one_line_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"lengths must give each of the 2 rows a length in 1..4"):
        Decoder(model, torch.zeros(2, 4, dtype=torch.long), SamplingConfig(), lengths=[4, 0])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        generate_completions(model, [[1]], 2, batch_size=0)


@pytest.mark.skipif(triton_unavailable_reason("cuda" if torch.cuda.is_available() else "cpu") is not None,
                    reason="Triton cannot run here")
@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["MHA", "MQA"])
def test_a_mixed_batch_on_the_triton_kernels_decodes_each_row_as_alone(n_kv_head, device):
    """kernels.decode_attention with kv_len per row and kernels.rope_qk at per-row positions (the interpreter
    on a CPU), fp32: each row equals its prompt decoded alone on the PyTorch ops, past block_size."""
    model = tiny(n_kv_head, vocab=53, n_embd=64).to(device)
    prompts = prompts_of([3, 9, 14], vocab=53)
    alone = [generate(model, torch.tensor([p], device=device), 12, temperature=0)[0, len(p):].tolist()
             for p in prompts]
    model.use_kernels("triton")
    assert model.kernels_in_use() == "triton"
    batched = decode(model, *padded(prompts, device), 12)
    assert batched.tolist() == alone
