import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig, load_model
from gpt.checkpoint import read_checkpoint
from gpt.quantize import quantize_int8
from kernels.testing import FWD_FACTOR, assert_close_to_reference
from tests.background import finish
from train.config import TrainConfig
from train.data.shards import ShardWriter, TokenSplit, open_shard
from train.evaluate import bits_per_byte, split_loss
from train.loop import Trainer, open_data


@pytest.mark.parametrize("length", [97, 16 * 6 + 1])  # a shorter last window, and none
def test_split_loss_scores_every_token_once_with_its_window_context(length):
    torch.manual_seed(0)
    T = 16
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=T, vocab_size=20)).eval()
    tokens = np.random.default_rng(0).integers(0, 20, length).astype(np.uint16)
    loss, n = split_loss(model, tokens, batch_size=4, device=torch.device("cpu"), dtype=torch.float32)
    assert n == length - 1
    # Brute force: token j is predicted from the tokens since the start of its window of T.
    data = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        ref = [F.cross_entropy(model(data[(j - 1) // T * T:j][None])[0][0, -1], data[j]) for j in range(1, length)]
    # fp32 both ways, summed in another order: a few ulps of the ~3-nat mean.
    assert loss == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)


def test_split_loss_reads_a_many_shard_split_as_one_stream(tmp_path):
    """Windows run from one shard into the next: the loss and count equal those of the concatenation,
    including a shard shorter than a window and an empty one."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=16, vocab_size=20)).eval()
    tokens = np.random.default_rng(1).integers(0, 20, 201).astype(np.uint16)
    shards = []
    for i, (a, b) in enumerate([(0, 70), (70, 75), (75, 75), (75, 201)]):
        with ShardWriter(tmp_path / f"s{i}.bin", np.uint16, "0" * 64) as w:
            w.add(tokens[a:b], [0] if b > a else [])
        shards.append(open_shard(tmp_path / f"s{i}.bin"))
    split = TokenSplit("val", shards, n_bytes=1000)
    cpu = torch.device("cpu")
    got = split_loss(model, split, 4, cpu, torch.float32)
    want = split_loss(model, tokens, 4, cpu, torch.float32)
    assert got[1] == want[1] == 200
    assert got[0] == pytest.approx(want[0], rel=1e-6)  # the same windows; only batch grouping could differ
    # Bits per byte: the total loss in bits over the bytes; here 200 tokens of 5 bytes each.
    assert bits_per_byte(got[0], got[1], 1000) == pytest.approx(got[0] * 200 / np.log(2) / 1000)
    assert bits_per_byte(got[0], got[1], 0) is None


def _per_token_losses(model, tokens: np.ndarray, T: int) -> torch.Tensor:
    """Cross-entropy of every token of `tokens[1:]`, in the consecutive windows split_loss uses."""
    data = torch.from_numpy(tokens.astype(np.int64))
    out = []
    with torch.no_grad():
        for s in range(0, len(data) - 1, T):
            x, y = data[s:s + T][None], data[s + 1:s + T + 1][None]
            x = x[:, :y.shape[1]]
            logits = model(x)[0][0]
            out.append(F.cross_entropy(logits.double(), y[0], reduction="none"))
    return torch.cat(out)


def test_a_checkpoint_trained_on_the_triton_kernels_is_scored_and_sampled_on_pytorch(tmp_path):
    """Trained with kernels='triton' (Triton's interpreter on this CPU), the checkpoint carries no kernel
    choice: the evaluator and the sampler run it on PyTorch with --kernels torch, and every token's loss
    matches the Triton model's within the kernel tests' rule (kernels/testing.py: at most 2x the float32
    PyTorch model's error against the float64 one, plus one float32 ulp)."""
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choice(words, 1500)) + "\n")
    T = 32
    # Two steps of 2 sequences: every step through the interpreted kernels costs seconds on a CPU.
    cfg = TrainConfig(dataset=str(tmp_path / "corpus.txt"), data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"),
                      model=dict(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=T), batch_size=2,
                      max_iters=2, eval_interval=2, eval_iters=1, warmup_iters=1, kernels="triton", device="cpu",
                      dtype="float32", progress=False)
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    Trainer(cfg).train()
    ckpt = tmp_path / "out" / "ckpt.pt"
    assert "kernels" not in read_checkpoint(ckpt)["model_config"]

    # The evaluator's and the sampler's command lines on a CPU without the interpreter, started now and read
    # below: they run beside the interpreted scoring here (each is mostly interpreter start-up).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    start = lambda *args: subprocess.Popen([sys.executable, "-m", *args, "--ckpt", str(ckpt), "--kernels", "torch"],
                                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
    ev, ev8, sample = (start("train.evaluate", "--json", "--dtype", "float32"),
                       start("train.evaluate", "--json", "--dtype", "float32", "--quantize", "int8"),
                       start("gpt.sample", "--prompt", "to be", "--max-tokens", "10", "--seed", "0", "--dtype", "float32"))

    val = open_data(cfg).val
    losses = {}
    for name, kernels, dtype in (("triton", "triton", torch.float32), ("torch32", "torch", torch.float32),
                                 ("torch64", "torch", torch.float64)):
        model, _, _ = load_model(ckpt, kernels=kernels)
        losses[name] = _per_token_losses(model.to(dtype), val, T)
    assert len(losses["triton"]) == len(val) - 1
    assert_close_to_reference("per-token loss", losses["triton"], losses["torch64"], losses["torch32"], FWD_FACTOR,
                              torch.float32)

    # The evaluator's CLI: exactly the in-process torch figure (the same computation on one thread: equal to
    # the last bit), whose tokens all passed the rule above.
    ev, ev8, sample = finish(ev), finish(ev8), finish(sample)
    assert ev.returncode == 0, ev.stderr
    cli = json.loads(ev.stdout)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want, n = split_loss(load_model(ckpt, kernels="torch")[0], val, 32, torch.device("cpu"), torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert (cli["tokens"], cli["loss"]) == (n, want) and n == len(val) - 1
    # --quantize int8 scores the int8 model (gpt/quantize.py): exactly the in-process figure, not the float one.
    assert ev8.returncode == 0, ev8.stderr
    torch.set_num_threads(1)
    try:
        want8, _ = split_loss(quantize_int8(load_model(ckpt, kernels="torch")[0].eval()), val, 32,
                              torch.device("cpu"), torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert json.loads(ev8.stdout)["loss"] == want8 != want
    assert sample.returncode == 0 and sample.stdout.startswith("to be") and "kernels torch -> torch" in sample.stderr, \
        sample.stderr
