"""python -m train --init-from DIR: start from a Hugging Face Llama folder's weights and tokenizer."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

from gpt.checkpoint import load_model
from gpt.errors import CheckpointError, ConfigError
from gpt.hf import export_hf
from train.config import TrainConfig
from train.loop import Trainer

pytestmark = pytest.mark.requires("safetensors")
SMALL_MODEL = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A short run on a local corpus, its final eval, and its export."""
    root = tmp_path_factory.mktemp("init")
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in the mind".split()
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(1500)))
    result = Trainer(TrainConfig(**config(root, "a", model=dict(SMALL_MODEL)))).train()
    model, tok, _ = load_model(root / "a" / "ckpt.pt", kernels="torch")
    export_hf(model, tok, root / "hf")
    return root, result


def config(root, out, **kw) -> dict:
    base = dict(dataset=str(root / "corpus.txt"), data_dir=str(root / "data"), batch_size=4, max_iters=10,
                eval_interval=10, eval_iters=2, log_interval=5, lr=3e-3, warmup_iters=2, device="cpu",
                dtype="float32", progress=False, out_dir=str(root / out))
    return {**base, **kw}


def test_a_run_initialized_from_the_export_starts_where_the_original_ended(exported):
    """Same weights, same tokenizer (so the same token ids), same eval batches: the same eval losses, to the bit."""
    root, before = exported
    trainer = Trainer(TrainConfig(**config(root, "b", init_from=str(root / "hf"))))
    assert trainer.data.dir.name.startswith("given-char-")  # tokenized with the folder's tokenizer
    ev = trainer.evaluate()
    assert (ev["train_loss"], ev["val_loss"]) == (before["train_loss"], before["val_loss"])
    after = trainer.train()
    assert after["iters"] == 10 and after["val_loss"] < before["val_loss"] + 0.05


def test_init_from_on_the_command_line_and_resume(exported, capsys):
    root, _ = exported
    args = [sys.executable, "-m", "train", "--init-from", str(root / "hf"), "--dataset", str(root / "corpus.txt"),
            "--data-dir", str(root / "data"), "--out-dir", str(root / "cli"), "--max-iters", "4", "--eval-interval",
            "2", "--eval-iters", "1", "--batch-size", "4", "--device", "cpu", "--dropout", "0.1", "--no-progress",
            "--n-layer", "2"]  # the folder's own value: allowed
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "initialized from" in first.stdout
    stop = load_model(root / "cli" / "ckpt.pt")[2]
    assert stop["iter"] == 4 and stop["model_config"]["dropout"] == 0.1
    # The resume through the same main(argv) in this process (a second python start costs seconds).
    import train.__main__ as cli
    capsys.readouterr()
    assert cli.main([*args[3:args.index("--max-iters")], "--max-iters", "6", *args[args.index("--max-iters") + 2:],
                     "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "initialized from" not in out
    assert load_model(root / "cli" / "ckpt.pt")[2]["iter"] == 6


def test_init_from_refuses_architecture_flags_and_missing_folders(exported, tmp_path):
    root, _ = exported
    with pytest.raises(ConfigError, match=r"n_layer=3 \(the folder's: 2\) cannot be set"):
        Trainer(TrainConfig(**config(root, "c", init_from=str(root / "hf"), model={"n_layer": 3, "n_embd": 32})))
    with pytest.raises(CheckpointError, match="is not a directory"):
        Trainer(TrainConfig(**config(root, "c", init_from=str(tmp_path / "nothing"))))
