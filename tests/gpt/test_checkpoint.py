"""Checkpoints load without running code (weights_only), older formats only when trusted, and the
kernel choice is never part of one."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt import GPT, GPTConfig, load_model
from gpt.checkpoint import read_checkpoint
from gpt.errors import CheckpointError, ConfigError
from gpt.tokenizer import CharTokenizer
from tests.background import finish
from train.checkpoint import rng_state, save_checkpoint, set_rng_state

ROOT = Path(__file__).resolve().parents[2]
CONFIG = dict(vocab_size=12, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, block_size=8)


class Payload:
    """Unpickling this runs os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _model_state():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    return model, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                   "tokenizer": CharTokenizer("abcdefghijkl").to_dict()}


def test_a_checkpoint_with_a_pickle_payload_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    _, state = _model_state()
    torch.save({**state, "extra": Payload(marker)}, tmp_path / "evil.pt")
    # From Python the hint names the argument; the CLIs below name their flag.
    with pytest.raises(CheckpointError, match="only pickle can load .* refused. If you trust the file, pass "
                                              "trust=True"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Both command lines side by side (each is mostly interpreter start-up).
    procs = [subprocess.Popen([sys.executable, "-m", *cli, "--ckpt", str(tmp_path / "evil.pt")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cli in (["gpt.sample", "--max-tokens", "2"], ["train.evaluate"])]
    for proc in (finish(p, timeout=120) for p in procs):
        err = proc.stderr
        assert proc.returncode == 2 and "Traceback" not in err and "--trust-checkpoint" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


def test_training_checkpoints_hold_only_tensors_and_plain_values(tmp_path):
    """rng states included: what exact resume needs round-trips through a weights_only load."""
    _, state = _model_state()
    np.random.seed(3)
    np.random.rand(5)
    saved = rng_state()
    save_checkpoint({**state, "rng": saved}, tmp_path / "ckpt.pt")
    want = np.random.rand(4)
    np.random.rand(7)  # move on, then restore from the file
    set_rng_state(read_checkpoint(tmp_path / "ckpt.pt")["rng"])
    assert np.array_equal(np.random.rand(4), want)
    assert read_checkpoint(tmp_path / "ckpt.pt")["format_version"] == 2


def test_an_older_checkpoint_loads_only_when_trusted_and_drops_runtime_fields(tmp_path, capsys):
    """Format 1: numpy's RNG state as an ndarray (pickle) and the kernel choice in the model config."""
    model, state = _model_state()
    old = {**state, "format_version": 1, "model_config": {**state["model_config"], "kernels": "triton",
                                                          "gradient_checkpointing": False},
           "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="trust=True"):
        load_model(tmp_path / "old.pt")
    loaded, tok, ck = load_model(tmp_path / "old.pt", kernels="torch", trust=True)
    err = capsys.readouterr().err
    assert "warning: loading" in err and "with pickle" in err
    assert "stores kernels='triton', gradient_checkpointing=False from an older format" in err
    assert loaded.kernels_in_use() == "torch" and tok.vocab_size == 12
    idx = torch.randint(0, 12, (1, 6))
    torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0], rtol=0, atol=0)
    set_rng_state(ck["rng"] | {"python": __import__("random").getstate()})  # numpy's own tuple still restores


def test_weights_that_do_not_fit_their_config_are_a_clear_error(tmp_path):
    _, state = _model_state()
    save_checkpoint({**state, "model_config": {**state["model_config"], "n_embd": 32}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="the weights do not fit its model config"):
        load_model(tmp_path / "bad.pt")


def test_error_hints_name_the_argument_from_python_and_the_flag_from_a_command_line(tmp_path):
    from gpt.errors import command_line
    from gpt.runtime import resolve_dtype
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ckpt.pt")
    assert "or give the path of an existing one" in str(e.value) and "--ckpt" not in str(e.value)
    with pytest.raises(ConfigError, match=r"use dtype='bfloat16' or dtype='float32'"):
        resolve_dtype("float16", torch.device("cpu"))
    with command_line():
        with pytest.raises(CheckpointError, match=r"or pass --ckpt PATH\)"):
            load_model(tmp_path / "ckpt.pt")
        with pytest.raises(ConfigError, match="use --dtype bfloat16 or --dtype float32"):
            resolve_dtype("float16", torch.device("cpu"))
