"""What the benchmark tests share: the output of the long commands of tests/jobs.py, started when the
session starts (tests/conftest.py `background_jobs`)."""
import json

import pytest


def _finished(background_jobs, name: str):
    job, out = background_jobs[name]
    proc = job.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "results.json").read_text()), out


@pytest.fixture(scope="session")
def quick_run(background_jobs):
    """One shrunken `--quick` run of jobs.SUITES, the data suite with nanoGPT's baseline:
    (stdout, results.json, output dir)."""
    proc, doc, out = _finished(background_jobs, "quick_run")
    return proc.stdout, doc, out


@pytest.fixture(scope="session")
def dry_run(background_jobs):
    """bench/gpu_check.py --dry-run on the CPU, both kernel paths in Triton's interpreter:
    (completed process, results.json, output dir)."""
    return _finished(background_jobs, "dry_run")
