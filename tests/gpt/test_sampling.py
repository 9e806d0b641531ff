"""Sampling controls: min-p, the penalties (and which tokens each counts), stop strings, the end-of-text
token (a finished row stops costing compute), several samples per prompt and prompts of different
lengths in one batch, seeds, and the sampler CLI (flags, interactive commands, one-line errors).

Most tests use a model whose next token is known: `successor_gpt` is a real GPT whose weights make
the next token the successor of the last one (in the character order below), with a chosen margin.
"""
import io
import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gpt import GPT, GPTConfig, ops
from gpt import sample as cli
from gpt.errors import ConfigError
from gpt.generation import (CompileEvent, Completion, SamplingConfig, StopStrings, apply_frequency_presence_penalty,
                            apply_min_p, apply_repetition_penalty, compiled, generate_completions, sample_next,
                            token_counts)
from gpt.tokenizer import CharTokenizer

CHARS = "\n abcdefghijklmn"      # 16 characters, sorted: the ids are their positions


def successor_gpt(margin: float = 20.0, block_size: int = 32) -> GPT:
    """A GPT whose logits are `margin` for the token after the last one (cyclically) and 0 elsewhere:
    one-hot embeddings, residual branches zeroed, lm_head mapping token t to t + 1."""
    V = len(CHARS)
    model = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=1, n_kv_head=1, n_embd=V, block_size=block_size,
                          tie_weights=False))
    with torch.no_grad():
        model.wte.weight.copy_(torch.eye(V))
        for block in model.blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        w = torch.zeros(V, V)
        t = torch.arange(V)
        w[(t + 1) % V, t] = margin / math.sqrt(V)    # the final RMSNorm scales a one-hot row by sqrt(V)
        model.lm_head.weight.copy_(w)
    return model.eval()


def ids(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


def record_batches(model) -> list[tuple[int, int]]:
    """(rows, tokens) of every forward the model runs from now on."""
    seen, forward = [], model.hidden_states

    def wrapped(idx, cache=None):
        seen.append(tuple(idx.shape))
        return forward(idx, cache=cache)

    model.hidden_states = wrapped
    return seen


def random_gpt(init_std: float = 0.02):
    """A random model; init_std 0.5 makes greedy decoding move around instead of repeating one token."""
    torch.manual_seed(1)
    return GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=24,
                         init_std=init_std)).eval()


# -- the logit processors, on distributions built by hand -----------------------------------------
def test_min_p_removes_tokens_below_the_threshold_and_never_samples_them():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])          # min_p 0.2: threshold 0.1 drops only the last
    masked = apply_min_p(probs.log(), 0.2)
    assert torch.isfinite(masked[0, :3]).all() and torch.isinf(masked[0, 3])
    g = torch.Generator().manual_seed(0)
    draws = sample_next(probs.log().expand(4000, 4), 1.0, generator=g, min_p=0.2)
    assert set(draws.unique().tolist()) == {0, 1, 2}
    assert torch.isfinite(apply_min_p(probs.log(), 1.0)[0, 0])          # the top token always stays
    assert torch.equal(apply_min_p(probs.log(), 0.0), probs.log())      # 0 = off


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    seen = torch.tensor([[True, False, True, False]])
    out = apply_repetition_penalty(logits, seen, 1.5)
    torch.testing.assert_close(out, torch.tensor([[2.0 / 1.5, 1.9, -1.5, 0.5]]))
    assert sample_next(logits, 0.0).item() == 0 and sample_next(out, 0.0).item() == 1   # another token wins
    torch.testing.assert_close(apply_repetition_penalty(logits, token_counts(torch.tensor([[0, 0, 2]]), 4), 1.5), out)


def test_frequency_and_presence_penalties_are_exact_arithmetic():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    counts = torch.tensor([[2.0, 0.0, 1.0]])
    torch.testing.assert_close(apply_frequency_presence_penalty(logits, counts, 0.3, 0.0),
                               torch.tensor([[2.4, 2.5, -0.3]]))
    torch.testing.assert_close(apply_frequency_presence_penalty(logits, counts, 0.0, 0.6),
                               torch.tensor([[2.4, 2.5, -0.6]]))
    # 3 - 2 * 0.2 = 2.6 > 2.5 keeps token 0; 3 - 2 * 0.3 = 2.4 < 2.5 hands the argmax to token 1.
    assert sample_next(apply_frequency_presence_penalty(logits, counts, 0.2), 0.0).item() == 0
    assert sample_next(apply_frequency_presence_penalty(logits, counts, 0.3), 0.0).item() == 1
    # Presence does not grow with the count: 0.4 keeps token 0 however often it occurred.
    many = torch.tensor([[50.0, 0.0, 0.0]])
    assert sample_next(apply_frequency_presence_penalty(logits, many, 0.0, 0.4), 0.0).item() == 0


def fixed_logits_gpt(logits: dict[int, float]) -> GPT:
    """A GPT whose next-token logits are `logits` (token: value, 0 elsewhere), whatever the context."""
    model = successor_gpt()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        for token, value in logits.items():
            model.lm_head.weight[token] = value / math.sqrt(len(CHARS))
    return model


def test_which_tokens_each_penalty_counts():
    """Token 3 has logit 2, token 5 logit 1, the rest 0: greedy always says 3 unless a penalty intervenes."""
    model = fixed_logits_gpt({3: 2.0, 5: 1.0})

    def greedy(prompt, n, **kw):
        return model.generate(torch.tensor([prompt]), n, temperature=0, **kw)[0, len(prompt):].tolist()

    assert greedy([0, 1], 3) == [3, 3, 3]
    # Repetition penalty 3 counts the prompt: 3 in the prompt -> 2/3 < 1, token 5 wins at once ...
    assert greedy([3, 0], 1, repetition_penalty=3.0) == [5]
    # ... and the generated tokens: 3, then 5 (2/3 < 1), then 3 again (2/3 > 1/3), each penalised once.
    assert greedy([0, 1], 3, repetition_penalty=3.0) == [3, 5, 3]
    # Frequency penalty 0.6 ignores the prompt's three 3s: 2, 2 - 0.6 = 1.4 > 1, 2 - 1.2 = 0.8 < 1.
    assert greedy([3, 3, 3], 3, frequency_penalty=0.6) == [3, 3, 5]
    # Presence penalty 1.5 ignores the prompt too: 3; then 0.5 < 1: 5; then 0.5 > -0.5: 3.
    assert greedy([3], 3, presence_penalty=1.5) == [3, 5, 3]
    # The same through the cache-free path.
    assert greedy([3], 3, presence_penalty=1.5, use_cache=False) == [3, 5, 3]


# -- end of text, stop strings, batches -----------------------------------------------------------
def test_eot_ends_a_row_and_its_compute_stops(device):
    model = successor_gpt().to(device)
    forwards = record_batches(model)
    eot = CHARS.index("e")
    prompts = torch.tensor([ids("a"), ids("c"), ids("f")], device=device)
    out = model.generate(prompts, 6, temperature=0, eot_id=eot)
    # Row 1 ends at its 2nd token (d, e), row 0 at its 4th (b, c, d, e), row 2 runs to the end.
    assert [r for r, _ in forwards] == [3, 3, 2, 2, 1, 1]
    e = CHARS.index("e")
    assert out[0, 1:].tolist() == ids("bcd") + [e, e, e]
    assert out[1, 1:].tolist() == ids("d") + [e] * 5
    assert out[2, 1:].tolist() == ids("ghijkl")
    # Every row done: the generation ends early.
    assert model.generate(prompts[:2], 10, temperature=0, eot_id=eot).shape == (2, 5)


def test_rows_left_after_a_drop_continue_exactly_as_without_it(device):
    """The KV cache rows are index-selected correctly: the survivors decode as they would have."""
    model = random_gpt(init_std=0.5).to(device)
    idx = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(0)).to(device)
    full = model.generate(idx, 24, temperature=0)                  # crosses block_size=24: the re-prefill too
    gen = full[:, 4:].tolist()
    eot = gen[1][2]                                                # row 1's 3rd token
    ends = [row.index(eot) + 1 if eot in row else len(row) for row in gen]
    assert ends[1] == 3 and max(ends) == 24                        # a row drops early, another runs on
    out = model.generate(idx, 24, temperature=0, eot_id=eot)
    assert torch.equal(out, model.generate(idx, 24, temperature=0, eot_id=eot, use_cache=False))
    for r in range(3):
        assert out[r, 4:4 + ends[r]].tolist() == gen[r][:ends[r]]
        assert (out[r, 4 + ends[r]:] == eot).all()


def test_stop_string_cuts_the_text_and_the_row():
    model = successor_gpt()
    tok = CharTokenizer(CHARS)
    [c] = generate_completions(model, [ids("a")], 10, tokenizer=tok, stop=["de", "zz"], temperature=0)
    assert (c.text, c.ids, c.finish_reason) == ("bc", ids("bc"), "stop")
    [c] = generate_completions(model, [ids("a")], 3, tokenizer=tok, stop=["x"], temperature=0)
    assert (c.text, c.finish_reason) == ("bcd", "length")


class Pairs:
    """Token i decodes to two characters: a stop string can start inside a token."""
    eot_id = None

    def decode(self, ids):
        return "".join(chr(ord("A") + i) + chr(ord("a") + i) for i in ids)


def test_a_stop_string_inside_a_token_cuts_the_text_there_and_the_ids_before_it():
    [c] = generate_completions(successor_gpt(), [[0]], 10, tokenizer=Pairs(), stop=["cD"], temperature=0)
    assert c.text == "BbC" and c.ids == [1] and c.finish_reason == "stop"
    matcher = StopStrings(["xy"], Pairs().decode)
    assert matcher.find([1, 2, 3]) is None


def test_num_samples_times_prompts_batched_whatever_their_lengths(device):
    model = successor_gpt().to(device)
    forwards = record_batches(model)
    prompts = [ids("ab"), ids("abc"), ids("hi")]
    out = generate_completions(model, prompts, 3, num_samples=2, tokenizer=CharTokenizer(CHARS), temperature=0)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [c.text for c in out] == ["cde", "cde", "def", "def", "jkl", "jkl"]
    # One batch: the prompts right-padded to 3 tokens x 2 samples in one prefill, then two steps of 6 rows.
    assert forwards == [(6, 3), (6, 1), (6, 1)]
    # batch_size bounds the rows decoded together: 4, then 2.
    forwards.clear()
    again = generate_completions(model, prompts, 3, num_samples=2, tokenizer=CharTokenizer(CHARS), temperature=0,
                                 batch_size=4)
    assert [c.text for c in again] == [c.text for c in out]
    assert forwards == [(4, 3), (4, 1), (4, 1), (2, 2), (2, 1), (2, 1)]


def test_batched_greedy_equals_one_prompt_at_a_time(device):
    model = random_gpt().to(device)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (3, 5, 3, 3)]
    batched = generate_completions(model, prompts, 8, temperature=0)
    alone = [generate_completions(model, [p], 8, temperature=0)[0] for p in prompts]
    assert [c.ids for c in batched] == [c.ids for c in alone]


def test_same_seed_same_samples_with_batching_and_dropped_rows(device):
    model = random_gpt().to(device)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8]]

    def run(seed):
        return [c.ids for c in generate_completions(model, prompts, 12, num_samples=3, eot_id=7, temperature=1.0,
                                                    top_k=20, min_p=0.01, repetition_penalty=1.2,
                                                    frequency_penalty=0.1, presence_penalty=0.1,
                                                    generator=torch.Generator().manual_seed(seed))]

    a, b, c = run(5), run(5), run(6)
    assert a == b and a != c
    assert len(a) == 9 and len({tuple(x) for x in a[:3]}) > 1       # the samples of one prompt differ


def test_invalid_sampling_values_are_config_errors():
    for bad in (dict(min_p=-0.1), dict(repetition_penalty=0.0), dict(top_p=0.0), dict(temperature=-1.0),
                dict(frequency_penalty=float("nan"))):
        with pytest.raises(ConfigError):
            SamplingConfig(**bad)
    model = successor_gpt()
    with pytest.raises(ConfigError, match="num_samples must be"):
        generate_completions(model, [[1]], 2, num_samples=0)
    with pytest.raises(ConfigError, match="need the tokenizer"):
        generate_completions(model, [[1]], 2, stop=["x"])
    with pytest.raises(ConfigError, match="min_p must be in"):
        model.generate(torch.tensor([[1]]), 2, min_p=-1.0)


def test_streamer_holds_back_a_possible_stop_string():
    out = io.StringIO()
    s = cli.Streamer(CharTokenizer(CHARS), out, stop=["de"])
    for t in ids("bcd"):
        s.push(t)
    assert out.getvalue() == "bc"                 # d may start "de": not printed yet
    s.push(ids("f")[0])
    assert out.getvalue() == "bcdf"               # it did not
    assert cli.held_back("xab", ["abc", "b"]) == 2


# -- the CLI ------------------------------------------------------------------------------------
@pytest.fixture
def ckpt(tmp_path):
    model = successor_gpt()
    path = tmp_path / "succ.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(),
                "tokenizer": CharTokenizer(CHARS).to_dict()}, path)
    return str(path)


BASE = ["--device", "cpu", "--dtype", "float32", "--kernels", "torch", "--temperature", "0"]


def test_cli_stop_strings_and_escapes(ckpt, capsys):
    assert cli.main(["--ckpt", ckpt, "--prompt", "a", "--max-tokens", "10", "--stop", "de", *BASE]) == 0
    assert capsys.readouterr().out == "abc\n"
    assert cli.main(["--ckpt", ckpt, "--prompt", "k", "--max-tokens", "10", "--stop", "\\n", *BASE]) == 0
    assert capsys.readouterr().out == "klmn\n"


def test_cli_prompts_file_times_num_samples_labelled(ckpt, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("a\n\nc\\nd\n", encoding="utf-8")          # two prompts; the second is "c", newline, "d"
    assert cli.main(["--ckpt", ckpt, "--prompts-file", str(f), "--num-samples", "2", "--max-tokens", "3",
                     *BASE]) == 0
    assert capsys.readouterr().out == ("--- prompt 1, sample 1 ---\nabcd\n--- prompt 1, sample 2 ---\nabcd\n"
                                       "--- prompt 2, sample 1 ---\nc\ndefg\n--- prompt 2, sample 2 ---\nc\ndefg\n")


def test_cli_seed_gives_the_same_samples(ckpt, capsys):
    # margin 0 would be uniform; the checkpoint's margin 20 is near-greedy, so sample a softened model.
    args = ["--ckpt", ckpt, "--prompt", "a", "--num-samples", "3", "--max-tokens", "12", "--device", "cpu",
            "--dtype", "float32", "--temperature", "8", "--seed"]
    runs = []
    for seed in ("1", "1", "2"):
        assert cli.main([*args, seed]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and runs[0] != runs[2]


class CharsWithEot(CharTokenizer):
    eot_id = CHARS.index("e")


def test_cli_stops_at_the_tokenizers_eot_unless_ignored(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (successor_gpt(), CharsWithEot(CHARS), {}))
    assert cli.main(["--prompt", "a", "--max-tokens", "10", *BASE]) == 0
    assert capsys.readouterr().out == "abcd\n"
    assert cli.main(["--prompt", "a", "--max-tokens", "6", "--ignore-eot", *BASE]) == 0
    assert capsys.readouterr().out == "abcdefg\n"


@pytest.mark.parametrize("args, message", [
    (["--min-p", "-0.5"], "--min-p must be in [0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--prompts-file", "no/such/file.txt"], "--prompts-file no/such/file.txt does not exist"),
    (["--stop", ""], "--stop needs a non-empty string"),
])
def test_cli_invalid_values_are_one_line_errors(args, message, capsys):
    assert cli.main(["--ckpt", "never-read.pt", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err


def test_interactive_commands_for_the_new_settings(monkeypatch, ckpt, capsys):
    lines = iter(["/help", "/temp 0", "/minp 0.05", "/rep 1.1", "/freq 0.2", "/pres 0.3", "/minp -1", "/rep 0",
                  "/stop d", "/eot off", "/show", "/tokens 8", "a", "/stop", "/show", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["--ckpt", ckpt, "--interactive", "--device", "cpu", "--dtype", "float32", "--no-compile"]) == 0
    out, err = capsys.readouterr()
    for cmd in ("/minp", "/rep", "/freq", "/pres", "/stop", "/eot"):
        assert cmd in cli.INTERACTIVE_HELP
    assert "(minp = 0.05)" in out and "(rep = 1.1)" in out and "(freq = 0.2)" in out and "(pres = 0.3)" in out
    assert "min_p=0.05 repetition_penalty=1.1 frequency_penalty=0.2 presence_penalty=0.3 stop='d' eot=off" in out
    assert "error: /minp must be in [0, 1]" in err and "error: /rep must be > 0" in err
    # "a" + newline is continued " abc" (successors of "\n"), cut before the stop string "d"; the reply to
    # the next command starts on a line of its own.
    assert " abc\n(stop = none)\n" in out and " abcd" not in out
    assert "stop=none" in out


def test_interactive_compiles_once_and_reuses_it_across_prompts(monkeypatch, ckpt, tmp_path, capsys):
    """Interactive mode compiles by default, prefill for one shape (padded to block_size): the first turn
    compiles prefill and the step (and says how long it took); later turns reuse them, though the context
    grows past 16 tokens (another bucket, formerly another compilation) and past block_size (a re-prefill),
    and a temperature change does not recompile either; the text is the eager decoder's."""
    turns = ["a", "k", "/temp 0.5", "c", "d"]     # contexts of 2, 12, 22 and 32 tokens; block_size 32
    monkeypatch.setattr(cli, "log_path", lambda: tmp_path / "lib.log")
    outs = {}
    for flag in ("--no-compile", None):
        lines = iter([*turns, "/quit"])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
        args = ["--ckpt", ckpt, "--interactive", "--max-tokens", "8", "--seed", "3", *BASE[:6]]
        assert cli.main(args + ([flag] if flag else [])) == 0
        outs[flag] = capsys.readouterr()
    out, err = outs[None]
    assert out == outs["--no-compile"].out
    compiled = [line for line in err.splitlines() if line.startswith("compiled ")]
    assert len(compiled) == 1, err                 # the first turn only
    assert "prefill (batch 1, 32 tokens) in" in compiled[0] and "step (batch 1) in" in compiled[0]
    assert "compiled" not in outs["--no-compile"].err


# -- the sampler's screen: the model's text and the sampler's own messages only -----------------
MESSAGES = ("loaded ", "compiling prefill", "interactive mode:", "compiled ", "(library warnings and compiler logs: ",
            "warning: ", "error: ", "(end of text)", "(generation stopped)")


def test_a_compiled_interactive_session_shows_only_the_text_and_the_samplers_messages(ckpt, tmp_path):
    """As a user saw it (`python -m gpt.sample --interactive` on a 2-core CPU): PyTorch's log lines (`W1203 ...
    No CUDA runtime is found`) and inductor's `Autotune Choices Stats` amid the text, the compile report glued
    to its end, and another compilation each time the growing context reached a new prefill bucket. Here
    stdout and stderr share one pipe, as they share a terminal: every line is a prompt, the model's text or
    one of the sampler's messages, each message starts a line, and only the first turn compiles."""
    proc = subprocess.run([sys.executable, "-m", "gpt.sample", "--ckpt", ckpt, "--interactive", "--compile",
                           "--max-tokens", "8", "--seed", "3", *BASE[:6]], input="a\nk\nc\nd\n", text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path, timeout=300)
    screen = proc.stdout
    assert proc.returncode == 0, screen[-3000:]
    text = set(CHARS)
    foreign = [line for line in screen.splitlines()
               if not line.startswith(MESSAGES) and not set(line.removeprefix("> ")) <= text]
    assert not foreign, screen[-3000:]
    # Each turn continues "<letter>\n" with its successors: " abcdefg" after the prompt, then a message or
    # the next prompt on a line of its own. The contexts are 2, 12, 22 and 32 tokens (block_size 32).
    turns = screen.split("\n> ")[1:]
    assert len(turns) == 5 and all(t.split("\n")[0] == " abcdefg" for t in turns[:4]), screen[-3000:]
    compiles = [line for line in screen.splitlines() if line.startswith("compiled ")]
    assert len(compiles) == 1 and "compiled prefill (batch 1, 32 tokens) in" in turns[0], screen[-3000:]
    for line in screen.splitlines():
        if line.startswith("(library warnings and compiler logs: "):
            Path(line.split(": ", 1)[1].rstrip(")")).unlink()


def test_library_output_goes_to_a_log_file_and_messages_start_their_own_line(monkeypatch, ckpt, tmp_path, capsys):
    """What other libraries print during generation (a PyTorch log record, a direct write to sys.stderr as
    inductor's autotuner does, a Python warning) goes to the log file, named once; this project's own
    warnings and the compile report are messages, each starting a line of its own, also after text that did
    not end with a newline."""
    def fake_generate(model, prompts, max_new_tokens, *, on_token=None, **kw):
        on_token(0, ids("b")[0])
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/x'")
        sys.stderr.write('Autotune Choices Stats:\n{"num_choices": 2}\n')
        warnings.warn("a library's warning", UserWarning)
        on_token(0, ids("c")[0])
        ops._warn_once("decoding without compilation: a reason")
        on_token(0, ids("d")[0])
        compiled.compile_log.append(CompileEvent("step", 1, 1, 0.5))
        return [Completion(0, 0, ids("bcd"), "bcd")]

    log = tmp_path / "lib.log"
    monkeypatch.setattr(cli, "log_path", lambda: log)
    monkeypatch.setattr(cli, "generate_completions", fake_generate)
    monkeypatch.setattr(compiled, "compile_log", [])
    monkeypatch.setattr(ops, "_WARNED", set())
    lines = iter(["a", "/show", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["--ckpt", ckpt, "--interactive", *BASE]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("bcd\ntemperature=0.0 ")           # the reply to /show on a line of its own
    # (captured apart, the newline a message starts with goes with the message)
    assert "\nwarning: decoding without compilation: a reason\n" in err
    assert "\ncompiled step (batch 1) in 0.5 s" in err
    assert f"\n(library warnings and compiler logs: {log})\n" in err
    for library in ("No CUDA runtime", "Autotune Choices Stats", "a library's warning"):
        assert library not in err and library not in out
    logged = log.read_text()
    assert "No CUDA runtime is found" in logged and "Autotune Choices Stats" in logged
    assert "UserWarning: a library's warning" in logged and "decoding without compilation" not in logged
    assert not isinstance(sys.stderr, cli.LibraryLog)          # restored


def test_screen_starts_a_message_on_a_new_line_only_after_unfinished_text():
    out = io.StringIO()
    screen = cli.Screen(out, out)
    screen.message("one")
    screen.write("text")
    screen.message("two")
    screen.write("more\n")
    screen.message("three", to_out=True)
    assert out.getvalue() == "one\ntext\ntwo\nmore\nthree\n"
