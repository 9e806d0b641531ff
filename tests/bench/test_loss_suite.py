"""The `loss` suite: one tiny run through bench/run.py, the memory window it measures with, and how --full
sizes the training step from its probes."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import loss_suite
from bench.common import RunContext

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-loss")
    # 2048 rows over 16,384 tokens: the unfused fp32 logits are 128 MiB, the fused path's chunks 64 MiB. fp32:
    # quicker than bf16 on CPUs without native bf16.
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--suite", "loss", "--device", "cpu",
           "--loss-shape", "2048,8,16384", "--dtype", "float32", "--preset", "tiny", "--batch-size", "2",
           "--seq-len", "32", "--no-compile", "--threads", "1", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "results.json").read_text())


def test_head_variants_agree_and_are_measured(tiny_run):
    _, doc = tiny_run
    head = [r for r in doc["results"]["loss"] if r["test"] == "head"]
    want = {"fused", "unfused"} | ({"torch_lce"} if loss_suite.has_torch_lce() else set())
    assert {r["variant"] for r in head} == want  # --no-compile: no compiled variant
    unfused = next(r for r in head if r["variant"] == "unfused")
    for r in head:
        assert r["kind"] == "measured" and "error" not in r, r
        assert (r["rows"], r["width"], r["vocab"], r["dtype"]) == (2048, 8, 16384, "float32")
        assert r["peak_mb"] > 0 and r["median_ms"] > 0 and r["steps_timed"] == 3 and "RSS" in r["memory_kind"]
        # the same inputs: the same loss and gradients up to float32 rounding
        assert r["loss"] == pytest.approx(unfused["loss"], rel=1e-5) and math.isfinite(r["loss"])
        assert r["grad_norm"] == pytest.approx(unfused["grad_norm"], rel=1e-4)
        assert r["memory_vs_unfused"] == pytest.approx(r["peak_mb"] / unfused["peak_mb"])
        assert r["speedup_vs_unfused"] == pytest.approx(unfused["median_ms"] / r["median_ms"])
    # logits near 0 over 16,384 tokens: the loss is near ln(16384) = 9.7
    assert unfused["loss"] == pytest.approx(math.log(16384), rel=0.02)
    # unfused: the logits, their log-softmax and gradient, 128 MiB each; fused: a few 64 MiB chunk tiles
    fused = next(r for r in head if r["variant"] == "fused")
    assert unfused["peak_mb"] > 3 * 128 * 0.95 and fused["peak_mb"] < 0.6 * unfused["peak_mb"]


def test_training_steps_fused_on_and_off(tiny_run):
    _, doc = tiny_run
    steps = {r["fused_loss"]: r for r in doc["results"]["loss"] if r["test"] == "train"}
    assert set(steps) == {"on", "off"}
    for mode, r in steps.items():
        assert r["kind"] == "measured" and "error" not in r, r
        assert (r["preset"], r["vocab"], r["batch"], r["seq"], r["tokens"]) == ("tiny", 16384, 2, 32, 64)
        assert r["fused_in_use"] == (mode == "on") and r["tokens_per_s"] > 0 and len(r["losses"]) == 4
        # the weights and AdamW's two moments alone: 3 x 4 bytes x the parameters
        assert r["peak_mb"] > 12 * r["params"] / 2 ** 20
    on, off = steps["on"], steps["off"]
    assert on["params"] == off["params"]
    assert on["losses"][0] == pytest.approx(off["losses"][0], rel=1e-4)  # same seed, weights, batch
    assert on["memory_vs_off"] == pytest.approx(on["peak_mb"] / off["peak_mb"])
    assert on["tokens_per_s_vs_off"] == pytest.approx(on["tokens_per_s"] / off["tokens_per_s"])
    assert on["memory_target_met"] == (on["memory_vs_off"] <= 0.5)


def test_tables_notes_and_summary(tiny_run):
    stdout, doc = tiny_run
    assert "loss: head + cross-entropy fwd+bwd alone, 2,048 rows x 8 -> vocab 16,384, float32" in stdout
    assert "loss: full training step of tiny, vocab 16,384" in stdout and "MEASURED" in stdout
    assert "target, kernels=torch: fused step peak" in stdout
    assert any("--no-compile" in n for n in doc["notes"])
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary == doc["summary"] and summary["records"] == {"loss": len(doc["results"]["loss"])}
    assert set(summary["loss_head"]) >= {"fused torch", "unfused"}
    assert len(summary["loss_train_step"]) == 2


def test_peak_memory_window_counts_what_the_work_adds():
    mem = loss_suite.PeakMemory(torch.device("cpu")).start()
    big = torch.ones(300 << 20, dtype=torch.uint8)  # 300 MiB, touched
    del big
    assert 290 << 20 <= mem.peak_bytes() < 400 << 20
    if mem.reset:  # a new window does not see the earlier peak
        again = loss_suite.PeakMemory(torch.device("cpu")).start()
        small = torch.ones(20 << 20, dtype=torch.uint8)
        assert again.peak_bytes() < 200 << 20
        del small


def test_full_mode_sizes_the_training_step_by_the_probes():
    probes = [(2048, 3000.0), (4096, 5000.0)]   # MB: 2000 MB more per 2048 tokens
    assert loss_suite.predict_peak_mb(probes, 16384) == pytest.approx(5000 + 2000 / 2048 * 12288)  # 17,000
    candidates = [(32, 512), (16, 512)]
    shape, predicted = loss_suite.pick_shape(candidates, probes, rss_before_mb=500.0, available_mb=24000.0)
    assert shape == (32, 512) and predicted == pytest.approx([17500.0, 9500.0])  # 17,500 <= 0.85 x 24,000
    assert loss_suite.pick_shape(candidates, probes, 500.0, 18000.0)[0] == (16, 512)  # 0.85 x 18,000 = 15,300
    assert loss_suite.pick_shape(candidates, probes, 500.0, 5000.0)[0] is None


def test_the_probes_run_real_workers(monkeypatch):
    """The probes' specs are ones the worker takes: two real unfused steps of `tiny` at toy sizes, each in its own
    process, measure a peak, and the step is sized from them."""
    monkeypatch.setattr(loss_suite, "PROBE_SHAPES", ((1, 16), (2, 16)))
    monkeypatch.setattr(loss_suite, "mem_available_bytes", lambda: 64 << 30)
    ctx = RunContext(torch.device("cpu"), quick=False, dtype=torch.float32, kernels=["torch"])
    records = []
    base = {"device": "cpu", "dtype": "float32", "threads": 1, "vocab": 512, "preset": "tiny"}
    assert loss_suite.train_shape(ctx, base, 300, records) == loss_suite.FULL_SHAPES[0], ctx.notes
    assert [r["tokens"] for r in records] == [16, 32]
    assert all(r["error"] is None and r["peak_mb"] > 0 for r in records), records
    assert not ctx.notes, ctx.notes


def test_full_mode_probes_then_says_when_it_falls_back_to_8192_tokens(monkeypatch):
    """The probes' peaks (here 3000 and 5000 MB) set the size: 16,384 tokens need 17.5 GB, over 85% of 18 GB."""
    specs = []

    def launch(spec, timeout):
        assert spec["test"] == "train", spec      # what the worker dispatches on
        specs.append(spec)
        return {"peak_mb": 1000.0 + spec["batch"] * spec["seq"] * 2000 / 2048, "process_rss_before_mb": 500.0}

    monkeypatch.setattr(loss_suite, "launch", launch)
    monkeypatch.setattr(loss_suite, "mem_available_bytes", lambda: 18000 << 20)
    ctx = RunContext(torch.device("cpu"), quick=False, dtype=torch.bfloat16, kernels=["torch"])
    records = []
    base = {"device": "cpu", "dtype": "bfloat16", "threads": 1, "vocab": 50257, "preset": "small"}
    assert loss_suite.train_shape(ctx, base, 60, records) == (16, 512)
    assert [(s["batch"], s["seq"], s["fused_loss"]) for s in specs] == [(4, 512, "off"), (8, 512, "off")]
    assert [(r["test"], r["tokens"], r["peak_mb"]) for r in records] == [("probe", 2048, 3000.0), ("probe", 4096, 5000.0)]
    assert any("8,192 tokens per micro-batch, not 16,384" in n for n in ctx.notes)
    monkeypatch.setattr(loss_suite, "mem_available_bytes", lambda: 24000 << 20)
    assert loss_suite.train_shape(ctx, base, 60, []) == (32, 512)
    ctx.batch_size = 3  # an explicit size is measured as asked, without probes
    specs.clear()
    assert loss_suite.train_shape(ctx, base, 60, []) == (3, 512) and not specs


def test_a_bad_worker_spec_is_a_one_line_error():
    with pytest.raises(SystemExit, match="not valid JSON"):
        loss_suite.parse_spec("{test: head}")
    with pytest.raises(SystemExit, match='needs "test": one of head, train'):
        loss_suite.parse_spec('{"batch": 2}')
    with pytest.raises(SystemExit, match="train spec lacks fused_loss, batch"):
        loss_suite.parse_spec('{"test": "train", "device": "cpu", "dtype": "float32", "threads": 1, "vocab": 64, '
                              '"preset": "tiny", "kernels": "torch", "seq": 8, "warmup": 1, "steps": 1}')
