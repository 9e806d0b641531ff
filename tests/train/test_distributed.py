"""torchrun training on CPU: 2 gloo ranks in spawned processes, against one process.

One torchrun job (tests/train/distributed_worker.py) runs every two-rank scenario in order; the
one-process references run in this process. Equivalence is checked against a tolerance derived from
the data, not chosen: one process run four ways (8 sequences x 1 micro-step, 4 x 2, 2 x 4, 1 x 8) sees
the same 8 sequences per step as 2 ranks x 2 sequences x 2 micro-steps, and the four runs differ only
in the float32 summation order of the gradient, which is all that DDP/FSDP change too. Two ranks
must stay within 2x the largest spread among the four (plus 4 ulp) of the 4 x 2 run. With Muon the
spread grows step by step (its bf16 Newton-Schulz turns last-bit differences into bf16 roundings
that flip), and so does the tolerance; with AdamW it stays at a few ulp.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import load_model, read_checkpoint
from train.checkpoint import sharded_checkpoint
from gpt.errors import CheckpointError
from train.config import TrainConfig
from train.consolidate import consolidate
from train.data import prepare_dataset
from train.loop import Trainer

from .test_loop import ShardedData

WORKER = Path(__file__).with_name("distributed_worker.py")
SMALL_MODEL = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32)
STEPS = 6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# No GPU for gloo ranks (a CUDA-visible gloo group once crashed inside fully_shard), one thread each.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and then runs away from the slow hunter".split()
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)))
    prepare_dataset(str(root / "corpus.txt"), "char", root / "data")  # the ranks then read the cache
    (root / "shards").mkdir()
    ShardedData(root / "shards")  # a corpus of documents, for --batching documents (the ranks open it)
    return root


def config(root: Path, out: str, **kw) -> dict:
    base = dict(dataset=str(root / "corpus.txt"), data_dir=str(root / "data"), model=dict(SMALL_MODEL),
                batch_size=2, grad_accum=2, max_iters=STEPS, eval_interval=3, eval_iters=2, log_interval=1,
                lr=3e-3, min_lr=3e-4, warmup_iters=2, device="cpu", dtype="float32", progress=False,
                out_dir=str(root / out))
    return {**base, **kw}


def losses(out_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in recs if "loss" in r}


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(out_dir / "ckpt.pt")["model"]


SCENARIOS = [
    dict(name="ddp_adamw", parallel="ddp", optimizer="adamw", audit=True),
    dict(name="ddp_muon", parallel="ddp", optimizer="muon"),
    dict(name="fsdp_adamw", parallel="fsdp", optimizer="adamw", logits=True, audit=True),
    dict(name="fsdp_muon", parallel="fsdp", optimizer="muon"),
    dict(name="ddp_resume_a", out="ddp_resume", parallel="ddp", stop_at=3),
    dict(name="ddp_resume_b", out="ddp_resume", parallel="ddp", resume=True),
    dict(name="fsdp_resume_a", out="fsdp_resume", parallel="fsdp", stop_at=3),
    dict(name="fsdp_resume_b", out="fsdp_resume", parallel="fsdp", resume=True),
    dict(name="fsdp_half", parallel="fsdp", stop_at=3),
    dict(name="ddp_compiled", parallel="ddp", compile=True, gradient_checkpointing=True, replicas=True),
    dict(name="fsdp_compiled", parallel="fsdp", compile=True, gradient_checkpointing=True),
    dict(name="signal", parallel="ddp", signal_at=2),
    dict(name="nan", parallel="ddp", eval_interval=1, nan_at=2),
    dict(name="budget", parallel="ddp", budget_at=3),
    # One run directory, one step per phase, every ordered pair of one process, DDP and FSDP; then two
    # resumes of the finished run (MIX_PHASES).
    *[dict(name=f"mix_{i}", out="mix", resume=i > 1, **({"parallel": mode, "batch_size": 2} if mode != "single"
                                                       else {"single": True, "batch_size": 4}),
           **({"stop_at": i} if i < 6 else {}))
      for i, mode in enumerate(["single", "ddp", "fsdp", "single", "fsdp", "ddp", "fsdp", "single"], start=1)],
    dict(name="ddp_documents", parallel="ddp", batching="documents", documents=True),
    dict(name="ddp_documents_half", parallel="ddp", batching="documents", documents=True, stop_at=3),
    dict(name="raise", parallel="ddp", eval_interval=2, raise_at=3),  # last: it ends the job
]
# The checkpoint each phase of the mixed run must resume from: the newer of ckpt.pt and ckpt_sharded.
MIX_PHASES = {2: "ckpt.pt", 3: "ckpt.pt", 4: "ckpt_sharded", 5: "ckpt.pt", 6: "ckpt_sharded", 7: "ckpt.pt",
              8: "ckpt.pt"}


WORKER_KEYS = ("stop_at", "signal_at", "raise_at", "nan_at", "budget_at", "logits", "audit", "replicas", "single",
               "documents")


@pytest.fixture(scope="module")
def job(root):
    """The two-rank job: (completed process, results per scenario, seconds from the injected failure
    to the end of the job)."""
    scenarios = []
    for sc in SCENARIOS:
        sc = dict(sc)
        name, out = sc.pop("name"), sc.pop("out", None)
        extra = {k: sc.pop(k) for k in WORKER_KEYS if k in sc}
        if extra.get("documents"):
            extra["documents"] = str(root / "shards")
        scenarios.append({"name": name, "cfg": config(root, out or name, **sc), **extra})
    spec = root / "spec.json"
    spec.write_text(json.dumps({"results": str(root / "results.json"), "scenarios": scenarios}))
    proc = subprocess.run([*TORCHRUN, str(WORKER), str(spec)], capture_output=True, text=True, env=ENV, timeout=240)
    end = time.time()
    results = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
    raised = root / "results.json.raised"
    after_failure = end - float(raised.read_text()) if raised.exists() else None
    return proc, results, after_failure


def run_one_process(root: Path, out: str, **kw) -> Path:
    Trainer(TrainConfig(**config(root, out, **kw))).train()
    return root / out


ARRANGEMENTS = ((4, 2), (8, 1), (2, 4), (1, 8))  # (batch, micro-steps); the first is the one compared against


@pytest.fixture(scope="module")
def references(root):
    """One process per optimizer and arrangement of the same 8 sequences per step."""
    return {opt: [run_one_process(root, f"one_{opt}_{b}x{m}", optimizer=opt, batch_size=b, grad_accum=m)
                  for b, m in ARRANGEMENTS] for opt in ("adamw", "muon")}


def ulps(x: float) -> float:
    return 4 * torch.finfo(torch.float32).eps * abs(x)


def loss_tolerance(runs: list[Path]) -> float:
    """2x the largest spread of the one-process arrangements' logged losses at any step."""
    ls = [losses(r) for r in runs]
    return 2 * max(max(l[i] for l in ls) - min(l[i] for l in ls) for i in ls[0])


def assert_matches_one_process(run: Path, refs: list[Path]) -> None:
    la, lr = losses(refs[0]), losses(run)
    assert sorted(lr) == sorted(la) == list(range(1, STEPS + 1))
    tol = loss_tolerance(refs)
    bad = {i: (lr[i], la[i]) for i in la if abs(lr[i] - la[i]) > tol + ulps(la[i])}
    assert not bad, f"losses differ from one process by more than {tol:.3g} (2x the arrangements' spread): {bad}"
    ws, wr = [weights(r) for r in refs], weights(run)
    for k in wr:
        stack = torch.stack([w[k] for w in ws])
        tol = 2 * (stack.amax(0) - stack.amin(0)).max().item() + ulps(stack.abs().max().item())
        err = (wr[k] - ws[0][k]).abs().max().item()
        assert err <= tol, f"{k}: max |two ranks - one process| {err:.3g} > {tol:.3g} (2x the arrangements' spread)"


def test_the_job_ran(job):
    proc, results, _ = job
    assert set(results) == {sc["name"] for sc in SCENARIOS[:-1]}, proc.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_ranks_train_like_one_process_with_twice_the_batch(root, job, references, parallel, optimizer):
    """With gradient accumulation (2 micro-steps), so the no-sync path is exercised; FSDP's weights are
    read from the single file consolidated at the end of the run."""
    assert_matches_one_process(root / f"{parallel}_{optimizer}", references[optimizer])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_resume_continues_exactly(root, job, parallel):
    whole, resumed = losses(root / f"{parallel}_adamw"), losses(root / f"{parallel}_resume")
    assert job[1][f"{parallel}_resume_a"]["iters"] == 3
    assert [resumed[i] for i in range(1, STEPS + 1)] == [whole[i] for i in range(1, STEPS + 1)]


def test_fsdp_checkpoint_loads_in_one_process_with_the_same_logits(root, job):
    saved = torch.load(root / "fsdp_adamw" / "logits.pt")
    model, _, ck = load_model(root / "fsdp_adamw" / "ckpt.pt", kernels="torch")
    assert ck["iter"] == STEPS
    with torch.no_grad():
        logits, _ = model(saved["idx"])
    # The same fp32 weights through the same ops: FSDP only gathered them.
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=ulps(saved["logits"].abs().max().item()))


def test_fsdp_checkpoint_resumes_on_another_number_of_ranks(root, job, references, monkeypatch):
    """Written by 2 ranks (batch 2 each) at step 3, resumed by 1 FSDP rank with batch 4: the same global
    batch, so the same samples; the state reshards. It must continue like the two-rank run."""
    run = root / "fsdp_half_on_one"
    shutil.copytree(root / "fsdp_half", run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    trainer = Trainer(TrainConfig(**config(root, run.name, parallel="fsdp", batch_size=4, resume=True)))
    try:
        trainer.train()
    finally:
        trainer.close()
    two, one, tol = losses(root / "fsdp_adamw"), losses(run), loss_tolerance(references["adamw"])
    for i in range(4, STEPS + 1):
        assert abs(one[i] - two[i]) <= tol + ulps(two[i]), (i, one[i], two[i], tol)


def test_every_resume_across_one_process_ddp_and_fsdp_continues_from_the_newest_checkpoint(root, job, references):
    """one process -> DDP -> FSDP -> one process -> FSDP -> DDP: each phase starts where the last one
    stopped, whichever format that wrote, so the run equals one uninterrupted run; resumes of the
    finished run (under FSDP, then in one process) change no file."""
    results = job[1]
    for i, source in MIX_PHASES.items():
        r = results[f"mix_{i}"]
        assert r["start_iter"] == min(i - 1, STEPS) and Path(r["resumed_from"]).parts[-1 if source == "ckpt.pt"
                                                                                     else -2] == source, (i, r)
    assert [results[f"mix_{i}"]["stop_reason"] for i in (6, 7, 8)] == ["max_iters", "complete", "complete"]
    assert results["mix_7"]["untouched"] and results["mix_8"]["untouched"]
    assert_matches_one_process(root / "mix", references["adamw"])  # one record per step, 1..STEPS


def test_consolidation_never_replaces_a_newer_single_file(root, job, capsys):
    """The mixed run ends with ckpt.pt at step 6 and the sharded checkpoint at step 5. (The command line's
    main(argv) runs in this process: test_consolidate_command_writes_the_file_the_sampler_reads runs it as
    a process of its own.)"""
    from train.consolidate import main
    run = root / "mix_consolidate"
    shutil.copytree(root / "mix", run)
    kept = (run / "ckpt.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"ckpt.pt is at iter 6, newer than the sharded checkpoint .* \(iter 5\)"):
        consolidate(run)
    assert (run / "ckpt.pt").read_bytes() == kept
    capsys.readouterr()
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "--force" in err, err
    assert (run / "ckpt.pt").read_bytes() == kept
    consolidate(run, force=True)
    assert read_checkpoint(run / "ckpt.pt")["iter"] == 5


def test_only_rank_0_writes_files(job):
    results = job[1]
    assert results["ddp_adamw"]["rank1_writes"] == []
    # Under FSDP, rank 1 writes its own shard of each sharded checkpoint and nothing else.
    writes = results["fsdp_adamw"]["rank1_writes"]
    # Either rank may be first to create the checkpoint folders (dcp.save makes them on every rank).
    others = [w for w in writes if not (("ckpt_sharded/iter-" in w and "__1_" in w) or
                                        (w.startswith("os.mkdir") and "ckpt_sharded" in w))]
    assert writes and not others, f"rank 1 wrote {others} (all its writes: {writes})"


def test_a_signal_on_one_rank_stops_both_at_the_same_step(root, job):
    assert job[1]["signal"]["outcomes"] == ["interrupted at 2"] * 2
    assert read_checkpoint(root / "signal" / "ckpt.pt")["iter"] == 2


def test_one_rank_out_of_time_ends_the_run_on_both_at_the_same_step(root, job):
    assert job[1]["budget"]["outcomes"] == ["time budget at 3"] * 2
    assert read_checkpoint(root / "budget" / "ckpt.pt")["iter"] == 3  # the final eval and save ran on both


def test_a_nan_on_one_rank_stops_both_and_keeps_the_last_good_checkpoint(root, job):
    assert job[1]["nan"]["outcomes"] == ["TrainingError at 2"] * 2
    ck = read_checkpoint(root / "nan" / "ckpt.pt")
    assert ck["iter"] == 1 and all(torch.isfinite(t).all() for t in ck["model"].values())


def test_a_rank_that_raises_ends_the_job_and_keeps_the_last_checkpoint(root, job):
    proc, _, after_failure = job
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 3" in proc.stderr
    assert after_failure is not None and after_failure < 60, after_failure
    assert read_checkpoint(root / "raise" / "ckpt.pt")["iter"] == 2


def test_consolidate_command_writes_the_file_the_sampler_reads(root, job):
    assert sharded_checkpoint(root / "fsdp_half") is not None and not (root / "fsdp_half" / "ckpt.pt").exists()
    out = subprocess.run([sys.executable, "-m", "train.consolidate", str(root / "fsdp_half")], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert read_checkpoint(root / "fsdp_half" / "ckpt.pt")["iter"] == 3
    from gpt.sample import main as sample   # the sampler's command line in this process
    assert sample(["--ckpt", str(root / "fsdp_half" / "ckpt.pt"), "--max-new-tokens", "5", "--prompt", "the"]) == 0


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_compile_and_gradient_checkpointing_under_both(root, job, references, parallel):
    """Blocks compiled in place, then wrapped: the same trajectory as the eager run, up to the float32
    rounding a fused kernel may change (the same kind of difference as the arrangements' spread)."""
    if parallel == "ddp":
        assert job[1]["ddp_compiled"]["replicas_equal"]
    compiled, eager = losses(root / f"{parallel}_compiled"), losses(root / f"{parallel}_adamw")
    tol = loss_tolerance(references["adamw"])
    assert sorted(compiled) == list(range(1, STEPS + 1))
    assert all(abs(compiled[i] - eager[i]) <= tol + ulps(eager[i]) for i in eager), (compiled, eager, tol)


def pytorch_noise_removed(stderr: str) -> list[str]:
    """The lines not written by PyTorch itself: gloo's connection log ("[Gloo] Rank 1 is connected ...",
    printed by torch 2.10) and Python warnings raised inside torch (the warning and its source line)."""
    lines, kept = stderr.splitlines(), []
    i = 0
    while i < len(lines):
        if lines[i].startswith("[Gloo]"):
            i += 1
        elif re.search(r"/torch/\S+:\d+: \w*Warning: ", lines[i]):
            i += 2 if i + 1 < len(lines) and lines[i + 1].startswith(" ") else 1
        else:
            kept.append(lines[i])
            i += 1
    return kept


def test_torchrun_command_line_rank_0_alone_prints(root):
    """The command a user runs. torchrun keeps each rank's stdout and stderr in its own file here."""
    cfg = config(root, "cli", parallel="fsdp", optimizer="muon", max_iters=4, eval_interval=2)
    flags = ["--dataset", cfg["dataset"], "--data-dir", cfg["data_dir"], "--out-dir", cfg["out_dir"],
             "--parallel", "fsdp", "--optimizer", "muon", "--max-iters", "4", "--eval-interval", "2",
             "--eval-iters", "2", "--batch-size", "2", "--grad-accum", "2", "--log-interval", "1",
             "--device", "cpu", "--dtype", "float32", "--no-progress",
             *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL_MODEL.items()]]
    logs = root / "cli_logs"
    proc = subprocess.run([*TORCHRUN, "--log-dir", str(logs), "--redirects", "3", "-m", "train", *flags],
                          capture_output=True, text=True, env=ENV, timeout=120)
    out = {f"{p.parent.name}/{p.stem}": p.read_text() for p in logs.rglob("*.log")}
    assert proc.returncode == 0, out
    assert pytorch_noise_removed(out["1/stdout"]) == pytorch_noise_removed(out["1/stderr"]) == [], out
    lines = out["0/stdout"].splitlines()
    assert "batch: 2 sequences per rank x 2 micro-steps x 2 ranks (fsdp) = 256 tokens/step" in lines, lines
    assert any(line.startswith("iter      4/4 | loss") for line in lines), lines
    assert any(line.startswith("result: ") for line in lines), lines
    assert read_checkpoint(Path(cfg["out_dir"]) / "ckpt.pt")["iter"] == 4  # consolidated at the end


def test_parallel_without_torchrun_says_how_to_launch(root, capsys):
    from train.__main__ import main
    assert main(["--parallel", "fsdp", "--dataset", str(root / "corpus.txt"), "--data-dir", str(root / "data")]) == 2
    err = capsys.readouterr().err
    assert "error: --parallel fsdp needs several processes" in err and "torchrun --nproc_per_node" in err


def test_a_sharded_only_run_resumes_in_one_process(root, job, references):
    """Written by 2 FSDP ranks at step 3 and never consolidated: one process (batch 4, the same global
    batch) loads the sharded state and continues like the two-rank run."""
    run = root / "sharded_only"
    shutil.copytree(root / "fsdp_half" / "ckpt_sharded", run / "ckpt_sharded")
    # The sampler, pointed at the missing single file, names the command that writes it.
    with pytest.raises(CheckpointError, match=f"python -m train.consolidate {run}"):
        read_checkpoint(run / "ckpt.pt")
    trainer = Trainer(TrainConfig(**config(root, run.name, batch_size=4, resume=True)))
    assert trainer.state.iter == 3 and trainer.resumed_from.parent.name == "ckpt_sharded"
    trainer.train()
    two, one, tol = losses(root / "fsdp_adamw"), losses(run), loss_tolerance(references["adamw"])
    for i in range(4, STEPS + 1):
        assert abs(one[i] - two[i]) <= tol + ulps(two[i]), (i, one[i], two[i], tol)


# -- --batching documents: rows packed from whole documents, one global schedule over the ranks -----------
@pytest.fixture(scope="module")
def document_references(root):
    """One process per arrangement of the same 8 rows per step, in documents batching."""
    data = ShardedData(root / "shards", write=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("train.loop.open_data", lambda cfg, tokenizer=None: data)
        return [run_one_process(root, f"one_documents_{b}x{m}", batching="documents", batch_size=b, grad_accum=m)
                for b, m in ARRANGEMENTS]


def test_two_ranks_in_documents_batching_train_like_one_process_with_twice_the_batch(root, job, document_references):
    assert_matches_one_process(root / "ddp_documents", document_references)
    two = read_checkpoint(root / "ddp_documents" / "ckpt.pt")["data_state"]
    for ref in document_references:  # the packer's state is global: the same for any split of the rows
        one = read_checkpoint(ref / "ckpt.pt")["data_state"]
        assert {k: v for k, v in one.items() if k != "buffer"} == {k: v for k, v in two.items() if k != "buffer"}
        assert torch.equal(one["buffer"], two["buffer"])
    assert two["mode"] == "documents" and two["cropped"] > 0


def test_a_two_rank_documents_checkpoint_resumes_in_one_process_with_the_same_rows(root, job, document_references):
    """Paused at step 3 by 2 ranks (2 rows each per micro-step), resumed by one process with 4: the
    document state is global, so the rest of the run packs the very same rows."""
    run = root / "ddp_documents_half_on_one"
    shutil.copytree(root / "ddp_documents_half", run)
    data = ShardedData(root / "shards", write=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("train.loop.open_data", lambda cfg, tokenizer=None: data)
        Trainer(TrainConfig(**config(root, run.name, batching="documents", batch_size=4, resume=True))).train()
    two, one, tol = losses(root / "ddp_documents"), losses(run), loss_tolerance(document_references)
    for i in range(4, STEPS + 1):
        assert abs(one[i] - two[i]) <= tol + ulps(two[i]), (i, one[i], two[i], tol)
    a = read_checkpoint(run / "ckpt.pt")["data_state"]
    b = read_checkpoint(root / "ddp_documents" / "ckpt.pt")["data_state"]
    assert (a["cursor"], a["cropped"], a["drawn"]) == (b["cursor"], b["cropped"], b["drawn"])
    assert torch.equal(a["buffer"], b["buffer"])
