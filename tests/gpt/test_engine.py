"""Continuous batching (gpt/generation/engine.py): requests through the engine give what `generate` and
`generate_completions` give for their prompt alone, slots are refilled as rows finish, a long request does not
hold up short ones, cancel and stop free slots, per-row settings and seeds, stop strings, end of text, and the
incremental text. Tiny models and bounded steps; waits have timeouts."""
import math
import threading
import warnings

import pytest
import torch

from gpt import GPT, GPTConfig
from gpt.errors import ConfigError
from gpt.generation import compiled, generate, generate_completions
from gpt.generation.engine import Engine, Event, RequestParams
from gpt.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("device")  # CUDA when present, else the CPU (tests/conftest.py)

WAIT_S = 60                       # the longest any test waits for the engine thread
RANDOM_CHARS = "".join(chr(c) for c in range(ord("0"), ord("0") + 50))   # 50 one-character tokens
CHARS = "\n abcdefghijklmn"      # the successor model's 16 tokens


def random_gpt(block_size=16):
    torch.manual_seed(1)
    return GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=block_size,
                         init_std=0.5)).eval()


def successor_gpt(margin: float = 20.0, vocab: int = len(CHARS), block_size: int = 32) -> GPT:
    """Next token = the last one + 1 (mod vocab), by `margin` (tests/gpt/test_sampling.py has the construction)."""
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=vocab, block_size=block_size,
                          tie_weights=False))
    with torch.no_grad():
        model.wte.weight.copy_(torch.eye(vocab))
        for block in model.blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        w = torch.zeros(vocab, vocab)
        t = torch.arange(vocab)
        w[(t + 1) % vocab, t] = margin / math.sqrt(vocab)
        model.lm_head.weight.copy_(w)
    return model.eval()


def prompts_of(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (n,), generator=g).tolist() for n in lengths]


def run(engine, requests, max_steps=500):
    """Step the engine (in this thread) until every request has finished; their events in order."""
    for _ in range(max_steps):
        if all(r.done for r in requests):
            break
        engine.step()
    assert all(r.done for r in requests), [r for r in requests if not r.done]
    return [list(r.events(timeout=0)) for r in requests]


def tokens_and_text(events):
    return [t for e in events for t in e.token_ids], "".join(e.text for e in events), events[-1].finish_reason


def test_greedy_requests_give_the_tokens_and_text_of_each_prompt_alone(device):
    """More requests than slots, prompts of different lengths (one longer than block_size), 30 tokens: every
    row passes block_size at its own step; text and tokens equal generate_completions for the prompt alone."""
    model = random_gpt().to(device)
    tok = CharTokenizer(RANDOM_CHARS)
    prompts = prompts_of([3, 9, 1, 16, 20, 5, 2])
    engine = Engine(model, tok, slots=3)
    requests = [engine.submit(p, RequestParams(max_tokens=30, temperature=0.0)) for p in prompts]
    assert engine.waiting() == 7 and engine.busy() == 0
    for r, events in zip(requests, run(engine, requests)):
        [alone] = generate_completions(model, [r.prompt_ids], 30, tokenizer=tok, temperature=0)
        ids, text, reason = tokens_and_text(events)
        assert (ids, text, reason) == (alone.ids, alone.text, "length")
        assert r.prompt_tokens == len(r.prompt_ids) and r.completion_tokens == 30 and r.finish_reason == "length"
    assert engine.busy() == 0 and engine.waiting() == 0
    assert not engine.step()                                  # no work left


def test_a_long_request_does_not_hold_up_short_ones(device):
    model = successor_gpt().to(device)
    engine = Engine(model, CharTokenizer(CHARS), slots=2)
    long = engine.submit([1], RequestParams(max_tokens=40, temperature=0.0))
    short = [engine.submit([2], RequestParams(max_tokens=3, temperature=0.0)) for _ in range(4)]
    finished_at = {}
    for step in range(1, 60):
        engine.step()
        for r in [long, *short]:
            if r.done and r.id not in finished_at:
                finished_at[r.id] = step
        assert engine.busy() <= 2
    # Each short one takes its slot as the one before it ends: 3, 6, 9, 12 steps; the long one ends at 40.
    assert [finished_at[r.id] for r in short] == [3, 6, 9, 12] and finished_at[long.id] == 40


def test_cancel_frees_the_slot_for_the_next_request(device):
    model = successor_gpt().to(device)
    engine = Engine(model, CharTokenizer(CHARS), slots=1)
    first = engine.submit([1], RequestParams(max_tokens=50, temperature=0.0))
    second = engine.submit([5], RequestParams(max_tokens=4, temperature=0.0))
    for _ in range(3):
        engine.step()
    assert engine.busy() == 1 and engine.waiting() == 1
    first.cancel()
    engine.step()                          # frees the slot, prefills the second request into it
    assert first.finish_reason == "cancelled" and engine.busy() == 1 and engine.waiting() == 0
    events = list(first.events(timeout=0))
    assert events[-1] == Event("", [], "cancelled") and tokens_and_text(events)[1] == "abc"
    [events] = run(engine, [second])
    assert tokens_and_text(events) == ([6, 7, 8, 9], "efgh", "length")
    waiting = engine.submit([1], RequestParams(max_tokens=5))
    waiting.cancel()                       # cancelled before it got a slot
    engine.step()
    assert list(waiting.events(timeout=0)) == [Event("", [], "cancelled")] and engine.busy() == 0


def test_seeded_requests_give_the_same_text_whatever_their_batch_mates(device):
    model = random_gpt().to(device)
    tok = CharTokenizer(RANDOM_CHARS)
    prompt = prompts_of([4])[0]
    params = RequestParams(max_tokens=20, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=11)

    def with_mates(mates):
        engine = Engine(model, tok, slots=4)
        others = [engine.submit(p, RequestParams(max_tokens=n, temperature=t, min_p=0.05, presence_penalty=0.5,
                                                 seed=s))
                  for p, n, t, s in zip(prompts_of([7, 2, 12], seed=9)[:mates], (5, 25, 9), (0.0, 1.5, 0.7), (1, 2, 3))]
        target = engine.submit(prompt, params)
        return tokens_and_text(run(engine, [target, *others])[0])[0]

    alone = with_mates(0)
    assert with_mates(1) == alone and with_mates(3) == alone
    want = generate(model, torch.tensor([prompt], device=device), 20, temperature=1.0, top_k=20, top_p=0.9,
                    repetition_penalty=1.3, generator=torch.Generator().manual_seed(11))[0, 4:].tolist()
    assert alone == want
    other_seed = Engine(model, tok, slots=1)
    r = other_seed.submit(prompt, RequestParams(**{**params.__dict__, "seed": 12}))
    assert tokens_and_text(run(other_seed, [r])[0])[0] != alone


def test_each_row_has_its_own_stop_strings_and_the_text_never_shows_them(device):
    model = successor_gpt().to(device)
    engine = Engine(model, CharTokenizer(CHARS), slots=3)
    a = engine.submit(CharTokenizer(CHARS).encode("a"), RequestParams(max_tokens=10, temperature=0.0, stop=("de",)))
    b = engine.submit(CharTokenizer(CHARS).encode("a"), RequestParams(max_tokens=10, temperature=0.0, stop=["f", "zz"]))
    c = engine.submit(CharTokenizer(CHARS).encode("a"), RequestParams(max_tokens=4, temperature=0.0, stop="x"))
    ea, eb, ec = run(engine, [a, b, c])
    assert tokens_and_text(ea)[1:] == ("bc", "stop") and all("d" not in e.text for e in ea)
    assert tokens_and_text(eb)[1:] == ("bcde", "stop")
    assert tokens_and_text(ec)[1:] == ("bcde", "length")
    # "d" might begin "de": held back one event, then sent with the token after it (here: the stop).
    assert [e.text for e in ea] == ["b", "c", "", ""] and ea[-1].token_ids == [CHARS.index("e")]


class CharsWithEot(CharTokenizer):
    eot_id = CHARS.index("e")


def test_the_end_of_text_token_ends_a_request(device):
    model = successor_gpt().to(device)
    engine = Engine(model, CharsWithEot(CHARS), slots=2)
    r = engine.submit([CHARS.index("a")], RequestParams(max_tokens=10, temperature=0.0))
    [events] = run(engine, [r])
    assert tokens_and_text(events) == ([CHARS.index(c) for c in "bcd"], "bcd", "stop")
    assert events[-1].token_ids == [] and r.completion_tokens == 4          # the eot is counted, not sent
    ignoring = Engine(model, CharsWithEot(CHARS), slots=1, eot_id=-1)      # an id never sampled: no eot
    r = ignoring.submit([CHARS.index("a")], RequestParams(max_tokens=6, temperature=0.0))
    assert tokens_and_text(run(ignoring, [r])[0])[1:] == ("bcdefg", "length")


class Bytes:
    """Token i is the byte BYTES[i]: characters of two and three UTF-8 bytes are cut between tokens."""
    BYTES = [0x61, 0xC3, 0xA9, 0x78, 0xE2, 0x82, 0xAC, 0x79, 0x20, 0x62, 0x63, 0x64]
    eot_id = None

    def decode(self, ids):
        return bytes(self.BYTES[i] for i in ids).decode("utf-8", errors="replace")


def test_the_text_never_ends_inside_a_utf8_character(device):
    model = successor_gpt(vocab=len(Bytes.BYTES)).to(device)
    engine = Engine(model, Bytes(), slots=1)
    r = engine.submit([0], RequestParams(max_tokens=9, temperature=0.0))
    [events] = run(engine, [r])
    assert [e.text for e in events] == ["", "é", "x", "", "", "€", "y", " ", "b"]
    assert "".join(e.text for e in events) == Bytes().decode(list(range(1, 10)))
    cut = engine.submit([0], RequestParams(max_tokens=1, temperature=0.0))     # ends mid-character
    assert tokens_and_text(run(engine, [cut])[0])[1] == "\ufffd"              # as generate_completions decodes it


def test_the_engine_thread_serves_callbacks_and_iterators(device):
    model = successor_gpt().to(device)
    engine = Engine(model, CharTokenizer(CHARS), slots=2)
    seen, threads, done = [], set(), threading.Event()

    def on_event(event):
        seen.append(event)
        threads.add(threading.current_thread().name)
        if event.finish_reason:
            done.set()

    engine.start()
    try:
        cb = engine.submit([1], RequestParams(max_tokens=5, temperature=0.0), on_event=on_event)
        it = engine.submit([3], RequestParams(max_tokens=3, temperature=0.0))
        events = list(it.events(timeout=WAIT_S))
        assert done.wait(WAIT_S)
    finally:
        engine.stop(timeout=WAIT_S)
    assert tokens_and_text(events) == ([4, 5, 6], "cde", "length")
    assert tokens_and_text(seen) == ([2, 3, 4, 5, 6], "abcde", "length") and threads == {"gpt-engine"}
    with pytest.raises(ConfigError, match="delivers its events to its on_event callback"):
        next(iter(cb))


def test_stop_drains_or_cancels_and_then_refuses_requests(device):
    model = successor_gpt().to(device)
    engine = Engine(model, CharTokenizer(CHARS), slots=2)
    engine.start()
    requests = [engine.submit([i], RequestParams(max_tokens=6, temperature=0.0)) for i in range(5)]
    engine.stop(drain=True, timeout=WAIT_S)
    assert [r.finish_reason for r in requests] == ["length"] * 5 and not engine._thread
    with pytest.raises(ConfigError, match="the engine is stopped"):
        engine.submit([1], RequestParams())

    engine = Engine(model, CharTokenizer(CHARS), slots=1)
    busy = engine.submit([1], RequestParams(max_tokens=1000, temperature=0.0))
    queued = engine.submit([2], RequestParams(max_tokens=1000, temperature=0.0))
    engine.step()
    engine.stop()                        # no thread: cancels in this one
    assert (busy.finish_reason, queued.finish_reason) == ("cancelled", "cancelled")
    assert busy.completion_tokens == 1 and engine.busy() == 0 and engine.waiting() == 0


def test_a_failing_step_ends_the_busy_requests_with_an_error(monkeypatch, device):
    model = successor_gpt().to(device)
    engine = Engine(model, CharTokenizer(CHARS), slots=2)
    r = engine.submit([1], RequestParams(max_tokens=5, temperature=0.0))

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(model, "hidden_states", broken)
    engine.step()
    assert r.finish_reason == "error" and "out of memory, say" in r.error
    monkeypatch.undo()
    again = engine.submit([1], RequestParams(max_tokens=2, temperature=0.0))
    assert tokens_and_text(run(engine, [again])[0])[1:] == ("ab", "length")


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", -1, "max_tokens must be an integer >= 0"),
    ("temperature", -0.5, "temperature must be >= 0"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("min_p", 2.0, "min_p must be in [0, 1]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("seed", -3, "seed must be an integer in [0, 2**63)"),
    ("stop", ("",), "stop strings must be non-empty strings"),
])
def test_invalid_request_settings_are_one_line_config_errors(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("*", r"\*")):
        RequestParams(**{field: value})


def test_invalid_prompts_and_slots_are_config_errors():
    model = successor_gpt()
    with pytest.raises(ConfigError, match="slots must be an integer >= 1"):
        Engine(model, CharTokenizer(CHARS), slots=0)
    engine = Engine(model, CharTokenizer(CHARS), slots=1)
    with pytest.raises(ConfigError, match="needs at least one token"):
        engine.submit([], RequestParams())
    with pytest.raises(ConfigError, match=r"token ids in \[0, 16\), got 99"):
        engine.submit([1, 99], RequestParams())
    zero = engine.submit([1], RequestParams(max_tokens=0))
    engine.step()
    assert list(zero.events(timeout=0)) == [Event("", [], "length")] and engine.busy() == 0


# -- compile=True: the static slots (gpt/generation/compiled.py) -------------------------------------------
MIXED_PARAMS = [RequestParams(max_tokens=30, temperature=0.0),
                RequestParams(max_tokens=12, temperature=0.9, top_k=7, seed=1),
                RequestParams(max_tokens=25, temperature=1.2, top_k=20, top_p=0.8, repetition_penalty=1.3, seed=2),
                RequestParams(max_tokens=8, temperature=0.0, frequency_penalty=0.7, presence_penalty=0.2),
                RequestParams(max_tokens=20, temperature=0.7, min_p=0.1, seed=3)]


def engine_texts(engine, prompts, params=MIXED_PARAMS):
    requests = [engine.submit(p, params) for p, params in zip(prompts, params)]
    return [tokens_and_text(events) for events in run(engine, requests)]


def test_the_static_slots_give_the_eager_engines_tokens(device):
    """Engine(compile=True) running its compiled functions eagerly (the same code compiles): the eager
    engine's tokens and text, for prompts of mixed lengths (one past block_size), more requests than slots,
    greedy and seeded rows with their own filters and penalties."""
    model = random_gpt().to(device)
    tok = CharTokenizer(RANDOM_CHARS)
    prompts = prompts_of([3, 9, 20, 1, 6])
    static = Engine(model, tok, slots=3, compile=True)
    if static.calls is None:
        pytest.skip("compilation is unavailable here: the engine decodes eagerly")
    static.calls.compile = False
    assert engine_texts(static, prompts) == engine_texts(Engine(model, tok, slots=3), prompts)


def test_the_compiled_engine_gives_the_eager_engines_tokens(device):
    """The real compilation, greedy and seeded rows of mixed lengths past block_size, more requests than slots:
    the eager engine's tokens, with one prefill graph (one bucket) and one step graph (the plan of the first
    two requests covers the rest)."""
    model = random_gpt(block_size=32).to(device)
    tok = CharTokenizer(RANDOM_CHARS)
    prompts = prompts_of([3, 9, 12, 1, 6])
    params = [RequestParams(max_tokens=n, temperature=t, seed=s)
              for n, t, s in zip((30, 12, 25, 8, 20), (0.0, 0.9, 0.0, 1.2, 0.7), range(5))]
    start = len(compiled.compile_log)
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # no fallback: it really compiled
        engine = Engine(model, tok, slots=2, compile=True)
        got = engine_texts(engine, prompts, params)
    assert engine.calls.compile
    assert sorted((e.kind, e.batch, e.length) for e in compiled.compile_log[start:]) == [("prefill", 1, 16),
                                                                                          ("step", 2, 1)]
    assert got == engine_texts(Engine(model, tok, slots=2), prompts, params)
