"""What the benchmark tests share: their long commands, started together (bench_jobs). One shrunken `--quick` run
of the suites through bench/run.py (a minute on 2 CPU cores), whose records test_run.py checks as a whole and
test_dist_suite.py / test_data_suite.py check for their suite's measured rows, instead of measuring them again;
the loss suite is left out of it: it runs through bench/run.py in test_loss_suite.py (its records, tables and
summary), and test_run.py checks that `--suite all` (the default) selects it with the others. And
bench/gpu_check.py's dry run (test_gpu_check.py)."""
import json
import os
import sys
from pathlib import Path

import pytest

from tests.background import Job

REPO = Path(__file__).resolve().parents[2]

# A kernels.report JSON as the compile report writes it (two rows), so the static suite is tested
# without minutes of ptxas.
FAKE_REPORT = {"triton": "x", "targets": [90], "quick": True, "notes": [], "summary": {},
               "rows": [{"module": "kernels.rms_norm", "kernel": "_rms_norm_fwd_kernel", "config": "a",
                         "target": "sm_90", "num_warps": 4, "num_stages": 1, "registers": 40, "stack": 0,
                         "local": 0, "shared": 2048, "tensor_cores": "-", "error": None, "problems": []},
                        {"module": "kernels.attention", "kernel": "attention_fwd", "config": "b",
                         "target": "sm_90", "num_warps": 8, "num_stages": 3, "registers": 200, "stack": 8,
                         "local": 0, "shared": 131072, "tensor_cores": "HGMMA", "error": None,
                         "problems": ["spills (stack 8 B, local 0 B)"]}]}

# The suites of the run (every one of `all` but loss, see above), and the settings its tests check: train
# and dist take these per sequence / rank.
SUITES = ("kernels", "train", "decode", "static", "dist", "data")
BATCH, SEQ = 2, 32


def _quick_run_command(out: Path) -> list:
    report = out / "fake_report.json"
    report.write_text(json.dumps(FAKE_REPORT))
    return [sys.executable, REPO / "bench" / "run.py", "--quick", "--suite", ",".join(SUITES), "--device", "cpu",
            "--preset", "tiny", "--sizes", "64", "--no-compile", "--batch-size", BATCH, "--seq-len", SEQ,
            "--new-tokens", "4", "--contexts", "16", "--threads", "1", "--report-json", report, "--data-mb", "1",
            "--data-baseline", "--out", out]


def _dry_run_command(out: Path) -> list:
    return [sys.executable, REPO / "bench" / "gpu_check.py", "--dry-run", "--device", "cpu", "--out", out]


# fixture name -> (the command for an output directory, whether its kernels run in Triton's interpreter)
COMMANDS = {"quick_run": (_quick_run_command, False), "dry_run": (_dry_run_command, True)}


@pytest.fixture(scope="session")
def bench_jobs(request, tmp_path_factory):
    """The benchmark commands whose output the selected tests read (COMMANDS), started together at the first
    of those tests: each keeps about one core busy (bench/run.py --threads 1; gpu_check's dry run is mostly
    Triton's interpreter), so side by side on 2 cores they take little longer than the longer one.
    fixture name -> (Job, output dir)."""
    wanted = [name for name in COMMANDS if any(name in item.fixturenames for item in request.session.items)]
    jobs = {}
    for name in wanted:
        command, interpret = COMMANDS[name]
        out = tmp_path_factory.mktemp(name)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (
            {"TRITON_INTERPRET": "1"} if interpret else {})
        jobs[name] = Job(command(out), cwd=REPO, env=env, workdir=out / "job", timeout=900), out
    yield jobs
    for job, _ in jobs.values():
        job.stop()


def _finished(bench_jobs, name: str):
    job, out = bench_jobs[name]
    proc = job.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "results.json").read_text()), out


@pytest.fixture(scope="session")
def quick_run(bench_jobs):
    """One shrunken `--quick` run of SUITES, the data suite with nanoGPT's baseline:
    (stdout, results.json, output dir)."""
    proc, doc, out = _finished(bench_jobs, "quick_run")
    return proc.stdout, doc, out


@pytest.fixture(scope="session")
def dry_run(bench_jobs):
    """bench/gpu_check.py --dry-run on the CPU, both kernel paths in Triton's interpreter:
    (completed process, results.json, output dir)."""
    return _finished(bench_jobs, "dry_run")
