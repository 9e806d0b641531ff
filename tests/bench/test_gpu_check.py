"""bench/gpu_check.py: its dry run (every step at toy sizes, both kernel paths through Triton's interpreter;
tests/jobs.py starts it) runs here, so the GPU command cannot rot; without a GPU and without
--dry-run it refuses in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args, interpret: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_every_step_ran_and_says_it_is_a_dry_run(dry_run):
    proc, doc, out = dry_run
    assert doc["mode"] == "dry-run" and "DRY RUN" in doc["label"] and "DRY RUN" in proc.stdout
    assert set(doc["results"]) == {"tests", "kernels", "attention", "train", "decode"} and not doc["notes"]
    tests = doc["results"]["tests"][0]
    assert tests["ok"] and tests["passed"] > 0 and tests.get("failed", []) == []
    assert {r["op"] for r in doc["results"]["kernels"] if "median_ms" in r} == {
        "rms_norm", "rms_norm_residual", "rope", "swiglu", "attention"}
    assert all("median_ms" in r for r in doc["results"]["attention"] if r["provider"] != "torch")
    assert sorted(json.loads(proc.stdout.strip().splitlines()[-1])) == ["device", "mode", "notes", "results", "seconds",
                                                                        "tests_ok"]
    for name in ("kernels_gbps.png", "attention_tflops.png", "train_loss_by_kernels.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_both_kernel_paths_trained_from_the_same_seed(dry_run):
    _, doc, _ = dry_run
    train = doc["results"]["train"]
    assert {r["kernels"] for r in train} == {"torch", "triton"}
    a, b = (r["curve"] for r in train)
    diffs = [abs(a[i] - b[i]) for i in a]
    assert train[0]["max_loss_diff"] == max(diffs)
    # Same initial weights and batches: the first losses agree to bf16 rounding, not to chance.
    assert diffs[0] < 0.01 and all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train)
    assert {(r["kernels"], r["batch"]) for r in doc["results"]["decode"]} == {
        ("torch", 1), ("torch", 2), ("triton", 1), ("triton", 2)}


def test_without_a_gpu_the_real_check_refuses_in_one_line(tmp_path):
    proc = _run("--device", "cpu", "--out", str(tmp_path / "out"), interpret=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: no CUDA GPU here (cpu); the check measures a GPU. Use --dry-run to run its "
                                   "steps at toy sizes on this device")
    assert not (tmp_path / "out").exists()
