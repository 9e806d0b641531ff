"""Compiled static-shape decoding (gpt/generation/compiled.py): the same tokens as the eager decoder, prefill buckets,
the masked decode attention, the exponential-race draw, the fallbacks where compilation fails, and prompts of
different lengths in one static batch (a length per slot)."""
import warnings

import pytest
import torch

from gpt import GPT, GPTConfig, ops
from gpt.errors import ConfigError
from gpt.generation import (CompiledDecoder, Decoder, SamplingConfig, compile_unavailable_reason, compiled,
                            generate, generate_completions, make_decoder, prefill, prefill_bucket, prefill_length,
                            race)
from gpt.ops import torch_decode_attention
from gpt.quantize import quantize_int8
from kernels import reference

pytestmark = pytest.mark.usefixtures("device")  # CUDA when present, else the CPU (tests/conftest.py)

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "filters": dict(temperature=0.9, top_k=12, top_p=0.9, min_p=0.05),
    "penalties": dict(temperature=1.1, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2),
}


def tiny(block_size=24, n_kv_head=2, vocab=50):
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32, block_size=block_size)
    return GPT(cfg).eval()


def run(dec, n):
    with torch.no_grad():
        return torch.cat([dec.step() for _ in range(n)], dim=1)


@pytest.mark.parametrize("pad", ["bucket", "block"])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["MHA", "MQA"])
def test_static_decoder_gives_the_eager_decoders_tokens(setting, n_kv_head, pad):
    """Uncompiled static path against the eager one, past block_size (two re-prefills) at batch 3: the
    same functions compile, so this pins the static-shape logic (masking, buckets or prompts padded to
    block_size, positions, state)."""
    model = tiny(block_size=16, n_kv_head=n_kv_head)
    idx = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(0)).to(model.wte.weight.device)
    s = SamplingConfig(**SETTINGS[setting])
    eager = run(Decoder(model, idx, s, torch.Generator().manual_seed(3)), 40)
    static = run(CompiledDecoder(model, idx, s, torch.Generator().manual_seed(3), compile=False, prefill_pad=pad), 40)
    assert torch.equal(static, eager)


@pytest.mark.parametrize("pad, lengths", [("bucket", [16, 16, 16]), ("block", [32, 32, 32])])
def test_prefill_gets_a_fresh_buffer_of_one_shape(monkeypatch, pad, lengths):
    """The compiled prefill is specialized on the strides of its token buffer: the tokens kept past block_size
    (a batch-1 slice of the window, which keeps the window's row stride) must reach it copied, or the
    re-prefill compiles again (as it did, and at every turn of an interactive session whose context was
    cropped to block_size). pad="block": one length for every prompt and re-prefill."""
    seen = []

    def recording(model, state, tokens, *args):
        seen.append((tokens.shape[1], tokens.stride(), tokens.storage_offset()))
        return prefill(model, state, tokens, *args)

    monkeypatch.setattr(compiled, "prefill", recording)
    model = tiny(block_size=32)
    idx = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(0))[:, -16:]   # a view
    run(CompiledDecoder(model, idx, SamplingConfig(temperature=0.0), compile=False, prefill_pad=pad), 40)
    assert [n for n, _, _ in seen] == lengths                 # the start and two re-prefills of 16 kept tokens
    assert all(stride == (n, 1) and offset == 0 for n, stride, offset in seen), seen
    assert prefill_length(5, 32, pad) == lengths[0] and prefill_length(300, 256, "bucket") == 256
    with pytest.raises(ConfigError, match="prefill_pad must be one of bucket, block"):
        make_decoder(model, idx, SamplingConfig(), prefill_pad="full")


def test_static_decoder_keeps_returning_only_the_rows_still_going():
    model = tiny()
    idx = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(1)).to(model.wte.weight.device)
    s = SamplingConfig(temperature=0.0)
    eager, static = Decoder(model, idx, s), CompiledDecoder(model, idx, s, compile=False)
    with torch.no_grad():
        for i in range(10):
            a, b = eager.step(), static.step()
            assert torch.equal(a, b) and torch.equal(eager.rows, static.rows)
            if i == 3:
                mask = torch.tensor([True, False, True], device=idx.device)
                eager.keep(mask)
                static.keep(mask)
                assert static.batch == 2
    assert static.state.layers[0].k.shape[0] == 3   # the batch shape stays: the dropped row is still computed


@pytest.mark.parametrize("length, bucket", [(1, 16), (16, 16), (17, 32), (100, 128), (200, 256), (300, 256)])
def test_prefill_buckets_are_powers_of_two_from_16_capped_at_block_size(length, bucket):
    assert prefill_bucket(length, 256) == bucket


@pytest.mark.parametrize("Tq", [1, 2])
def test_torch_decode_attention_attends_to_each_rows_valid_keys_only(Tq, device):
    """Against the reference attention over each row's first kv_len keys. Past kv_len the keys are NaN and
    the values huge: neither may reach the output (values must be finite there: 0 x inf is NaN)."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D = 3, 4, 2, 20, 16
    q = torch.randn(B, H, Tq, D, generator=g).to(device)
    k = torch.randn(B, Hkv, L, D, generator=g).to(device)
    v = torch.randn(B, Hkv, L, D, generator=g).to(device)
    kv_len = torch.tensor([2, 11, 20], device=device)
    for b, n in enumerate(kv_len.tolist()):
        k[b, :, n:], v[b, :, n:] = float("nan"), 1e30
    out = torch_decode_attention(q, k, v, kv_len)
    for b, n in enumerate(kv_len.tolist()):
        want = reference.attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=True)
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-5, atol=1e-5)   # fp32: summation order only


def test_a_query_that_sees_no_key_gets_zero_not_nan(device):
    q, k, v = (torch.randn(1, 2, 1, 8, device=device) for _ in range(3))
    out = torch_decode_attention(q, k, v, torch.tensor([0], device=device))
    assert torch.equal(out, torch.zeros_like(out))


def test_the_exponential_race_draws_each_token_with_its_probability():
    """argmax(p / Exp(1)) is a draw from p: over n draws each count is within 5 binomial sigmas of n p."""
    p = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03, 0.0])
    n = 40_000
    g = torch.Generator().manual_seed(0)
    noise = torch.empty(n, p.numel()).exponential_(generator=g)
    counts = torch.bincount(race(p.expand(n, -1), noise)[:, 0], minlength=p.numel()).double()
    sigma = (n * p * (1 - p)).double().sqrt()
    assert counts[-1] == 0                                    # a zero-probability token never wins
    assert ((counts - n * p.double()).abs() <= 5 * sigma + 1e-9).all(), counts.tolist()


def test_race_never_picks_a_zero_probability_token_when_the_noise_is_zero():
    p = torch.tensor([[0.0, 1.0, 0.0]])
    assert race(p, torch.zeros(1, 3)).item() == 1


def test_without_a_cpp_compiler_make_decoder_says_so_and_decodes_eagerly(monkeypatch):
    model = tiny()
    idx = torch.zeros(1, 3, dtype=torch.long)
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    monkeypatch.setattr(ops, "_WARNED", set())
    reason = compile_unavailable_reason(torch.device("cpu"))
    assert "C++ compiler" in reason
    with pytest.warns(UserWarning, match="decoding without compilation: inductor needs a C\\+\\+ compiler"):
        dec = make_decoder(model, idx, SamplingConfig(), compile=True)
    assert isinstance(dec, Decoder)
    assert "not used on mps" in compile_unavailable_reason(torch.device("mps"))


def test_a_compilation_failure_falls_back_to_the_same_functions_eagerly(monkeypatch, device):
    model = tiny()
    idx = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(2)).to(device)

    def broken(fn, device):
        def call(*args):
            raise RuntimeError("no compiler today")
        return call

    monkeypatch.setattr(compiled, "_compiled_fn", broken)
    monkeypatch.setattr(ops, "_WARNED", set())
    monkeypatch.setattr(compiled, "_seen_keys", set())
    want = generate(model, idx, 8, temperature=0.0)
    with pytest.warns(UserWarning, match="compiling the decode step failed .*no compiler today"):
        got = generate(model, idx, 8, temperature=0.0, compile=True)
    assert torch.equal(got, want)


def test_compiled_decoding_gives_the_eager_tokens_and_compiles_once(device):
    """The real compilation (inductor C++ on the CPU, CUDA graphs on a GPU): greedy and sampled text,
    batch 2, past block_size, equal to the eager decoder's; a second call compiles nothing new. Tokens may
    only differ where two logits are within the rounding of a different summation order, which these
    fp32 logits of a tiny model are not (checked: they are equal)."""
    model = tiny(block_size=32).to(device)
    idx = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(4)).to(device)
    kw = dict(temperature=0.8, top_k=20, repetition_penalty=1.2)
    start = len(compiled.compile_log)
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # no fallback: it really compiled
        got = generate(model, idx, 40, generator=torch.Generator().manual_seed(5), compile=True, **kw)
    events = compiled.compile_log[start:]
    # one compilation each, though the 45 tokens pass block_size (a second prefill of the same bucket)
    assert sorted((e.kind, e.length) for e in events) == [("prefill", 16), ("step", 1)], events
    assert all(e.seconds > 0 for e in events)
    want = generate(model, idx, 40, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(got, want)
    # Another prompt of the same bucket, another seed and temperature: nothing recompiles.
    kw["temperature"] = 1.3
    again = generate(model, idx[:, 1:], 40, generator=torch.Generator().manual_seed(6), compile=True, **kw)
    assert len(compiled.compile_log) == start + 2
    assert torch.equal(again, generate(model, idx[:, 1:], 40, generator=torch.Generator().manual_seed(6), **kw))


def test_int8_model_decodes_on_the_static_path_like_the_eager_one():
    model = quantize_int8(tiny(block_size=16))
    idx = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(7)).to(model.wte.weight.device)
    s = SamplingConfig(temperature=0.0)
    assert torch.equal(run(CompiledDecoder(model, idx, s, compile=False), 20), run(Decoder(model, idx, s), 20))


def test_bf16_static_decoding_gives_the_eager_bf16_tokens():
    """bf16 weights, cache and autocast: the static path against the eager one at the same precision."""
    model = tiny().to(torch.bfloat16)
    idx = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(8)).to(model.wte.weight.device)
    s = SamplingConfig(temperature=0.0)
    want = run(Decoder(model, idx, s, dtype=torch.bfloat16), 30)
    got = run(CompiledDecoder(model, idx, s, dtype=torch.bfloat16, compile=False), 30)
    assert torch.equal(got, want)


def test_the_compiled_step_never_runs_stale_weights(device, step_without_autotune):
    """The CPU step is compiled with the weights frozen into it: another model of the same shapes, and the
    same model after an in-place update, must still decode with their own current weights. (Frozen as users
    get it; without max_autotune, which picks the matmuls, not whether the weights are frozen: tests/conftest.py.)"""
    first, second = tiny(block_size=32).to(device), tiny(block_size=32).to(device)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(9)).to(device)
    for model in (first, second, first):
        assert torch.equal(generate(model, idx, 12, temperature=0.0, compile=True),
                           generate(model, idx, 12, temperature=0.0))
    with torch.no_grad():
        first.lm_head.weight.mul_(-1.0)           # in place, as an optimizer step would
    assert torch.equal(generate(first, idx, 12, temperature=0.0, compile=True),
                       generate(first, idx, 12, temperature=0.0))


# -- per-slot lengths: prompts of different lengths in one static batch --------------------------------------
def padded(prompts, device):
    idx = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p)
    return idx.to(device), [len(p) for p in prompts]


MIXED = [3, 9, 1, 16, 21]      # one token, a few, exactly block_size (16), past it (cropped)


@pytest.mark.parametrize("setting", ["greedy", "filters"])
def test_a_mixed_batch_on_the_static_decoder_gives_the_eager_decoders_tokens(setting, device):
    """Uncompiled static path, prompts of different lengths, 40 tokens (every row re-prefills at its own step,
    alone while the others decode): the eager decoder's tokens (the same noise draws), and in greedy, with a
    row dropped halfway, each row's tokens alone. (Sampled, a drop would part them: the eager decoder then
    draws noise for the rows left, the static one for every slot.)"""
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16,
                          init_std=0.5)).eval().to(device)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in MIXED]
    idx, lengths = padded(prompts, device)
    s = SamplingConfig(**SETTINGS[setting])
    decoders = [Decoder(model, idx, s, torch.Generator().manual_seed(5), lengths=lengths),
                CompiledDecoder(model, idx, s, torch.Generator().manual_seed(5), compile=False, lengths=lengths)]
    outs = [[], []]
    with torch.no_grad():
        for i in range(40):
            for dec, out in zip(decoders, outs):
                out.append(dict(zip(dec.rows.tolist(), dec.step()[:, 0].tolist())))
                if i == 20 and setting == "greedy":
                    dec.keep(torch.tensor([True, True, False, True, True], device=device))
    assert outs[0] == outs[1]
    if setting == "greedy":
        assert decoders[1].state.pos.tolist()[2] <= 16        # the dropped row is held: its length stays
        for b, p in enumerate(prompts[:2]):
            alone = generate(model, torch.tensor([p], device=device), 40, temperature=0)[0, len(p):].tolist()
            assert [step[b] for step in outs[1]] == alone


def test_a_mixed_batch_compiled_gives_each_prompt_alone(device, step_without_autotune):
    """The real compilation (inductor on the CPU, frozen weights without max_autotune: tests/conftest.py; CUDA
    graphs on a GPU), greedy fp32: a batch of prompts of different lengths through
    generate_completions(compile=True) equals each prompt decoded alone, eagerly."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32,
                          init_std=0.5)).eval().to(device)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (3, 11, 6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # no fallback: it really compiled
        got = generate_completions(model, prompts, 36, temperature=0, compile=True)   # crosses block_size
    alone = [generate_completions(model, [p], 36, temperature=0)[0].ids for p in prompts]
    assert [c.ids for c in got] == alone
