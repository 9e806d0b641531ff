"""The long commands whose output tests read, started with the session in the background (tests/conftest.py
`background_jobs`, tests/background.py) so that they run while the tests before their readers leave a core idle:
- quick_run: one shrunken `--quick` run of the suites through bench/run.py (a minute on 2 CPU cores), whose
  records tests/bench/test_run.py checks as a whole and test_dist_suite.py / test_data_suite.py check for their
  suite's measured rows, instead of measuring them again (the loss suite is left out of it: it runs through
  bench/run.py in test_loss_suite.py, its records, tables and summary, and test_run.py checks that `--suite all`,
  the default, selects it with the others);
- dry_run: bench/gpu_check.py's dry run (tests/bench/test_gpu_check.py);
- quick_report: `python -m kernels.report --quick --json FILE` (tests/kernels/test_report.py), whose ptxas
  runs beside the interpreted kernel tests."""
import json
import os
import sys
from pathlib import Path

from tests.background import Job

REPO = Path(__file__).resolve().parents[1]

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


def _report_command(out: Path) -> list:
    # The kernel modules are imported without the interpreter (interpret=False below) for triton.compile.
    return [sys.executable, "-m", "kernels.report", "--quick", "--json", out / "report.json"]


# fixture name -> (the command for an output directory, whether its kernels run in Triton's interpreter,
# the seconds it may take from the start)
COMMANDS = {"quick_run": (_quick_run_command, False, 1500), "dry_run": (_dry_run_command, True, 1500),
            "quick_report": (_report_command, False, 900)}


def start(name: str, tmp_path_factory) -> tuple[Job, Path]:
    """COMMANDS[name] started in the background at the lowest CPU priority (nice 19: it takes only what the
    tests leave idle): (its Job, its output directory)."""
    command, interpret, timeout = COMMANDS[name]
    out = tmp_path_factory.mktemp(name)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (
        {"TRITON_INTERPRET": "1"} if interpret else {})
    return Job(command(out), cwd=REPO, env=env, workdir=out / "job", timeout=timeout, nice=19), out
