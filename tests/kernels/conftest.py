"""Every kernel test runs on the `device` fixture (tests/conftest.py): CUDA when present, else the CPU
with Triton's interpreter. The compile report's command (test_report.py) starts with the first kernel test."""
import os
import sys
from pathlib import Path

import pytest

from tests.background import Job

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _on_device(device):
    yield


@pytest.fixture(scope="package", autouse=True)
def report_job(request, tmp_path_factory):
    """`python -m kernels.report --quick --json FILE` for test_report.py, started with the first kernel test where
    that file's tests are selected, in the background at the lowest CPU priority (nice 19): its ptxas runs on
    the core the interpreted kernel tests before test_report.py leave idle. (Job, FILE), or None."""
    if not any("quick_report" in item.fixturenames for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("report")
    # The kernel modules must be imported without the interpreter for triton.compile to take them.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    job = Job([sys.executable, "-m", "kernels.report", "--quick", "--json", out / "report.json"], cwd=ROOT, env=env,
              workdir=out, timeout=900, nice=19)
    yield job, out / "report.json"
    job.stop()
