"""What the benchmark tests share: one shrunken `--quick` run of the suites through bench/run.py (a minute on 2
CPU cores), whose records test_run.py checks as a whole and test_dist_suite.py / test_data_suite.py check for
their suite's measured rows, instead of measuring them again. The loss suite is left out of it: it runs through
bench/run.py in test_loss_suite.py (its records, tables and summary), and test_run.py checks that `--suite all`
(the default) selects it with the others."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One shrunken `--quick` run of SUITES, the data suite with nanoGPT's baseline:
    (stdout, results.json, output dir)."""
    out = tmp_path_factory.mktemp("bench")
    report = out / "fake_report.json"
    report.write_text(json.dumps(FAKE_REPORT))
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--suite", ",".join(SUITES), "--device", "cpu",
           "--preset", "tiny", "--sizes", "64", "--no-compile", "--batch-size", str(BATCH), "--seq-len", str(SEQ),
           "--new-tokens", "4", "--contexts", "16", "--threads", "1", "--report-json", str(report), "--data-mb", "1",
           "--data-baseline", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "results.json").read_text()), out
