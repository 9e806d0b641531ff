"""python -m kernels.report: the kernels compile for sm_80 and sm_90 without spills (no GPU needed)."""
import json

import pytest

from kernels import report


@pytest.fixture(scope="module")
def quick_report(background_jobs):
    """One run of `python -m kernels.report --quick --json FILE`, started with the session (tests/jobs.py):
    (process, parsed JSON)."""
    job, out = background_jobs["quick_report"]
    proc = job.result()
    out = out / "report.json"
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


EXPECTED_KERNELS = {
    "kernels._rms_norm": {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"},
    "kernels._rope": {"_rope_kernel"},
    "kernels._swiglu": {"_swiglu_fwd_kernel", "_swiglu_bwd_kernel"},
    "kernels._attention": {"_attn_fwd_kernel", "_attn_decode_kernel", "_attn_combine_kernel",
                          "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"},
    "kernels._linear_cross_entropy": {"_lce_fwd_kernel", "_lce_bwd_dx_kernel", "_lce_bwd_dw_kernel"},
}


@pytest.mark.parametrize("module", report.MODULES)
def test_quick_report_rows(quick_report, module):
    """Every config of `module` compiled for sm_80 and sm_90, without spills, with plausible registers."""
    proc, data = quick_report
    rows = [r for r in data["rows"] if r["module"] == module]
    assert rows, f"{module}: no rows; notes: {data['notes']}"
    kernels = {r["kernel"] for r in rows}
    assert EXPECTED_KERNELS[module] <= kernels, f"{module}: missing {EXPECTED_KERNELS[module] - kernels}"
    for name in kernels:
        assert {r["target"] for r in rows if r["kernel"] == name} == {"sm_80", "sm_90"}
    for r in rows:
        where = f"{r['kernel']} [{r['config']}] on {r['target']}"
        assert r["error"] is None, f"{where}: {r['error']}"
        assert r["stack"] == 0 and r["local"] == 0, f"{where} spills {r['stack']} + {r['local']} bytes"
        assert 8 <= r["registers"] <= 255, f"{where}: implausible register count {r['registers']}"
        assert r["problems"] == [], f"{where}: {r['problems']}"


def test_quick_report_summary(quick_report):
    proc, data = quick_report
    rows = data["rows"]
    bad = [r for r in rows if r["problems"]]
    assert proc.returncode == (1 if bad else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert data["summary"]["total"] == len(rows) > 0
    assert data["summary"]["failed"] == len(bad)
    assert proc.stdout.count(" ok\n") == len(rows) - len(bad), "the table should list every row"


def test_refuses_to_compile_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        report.run(quick=True)


def test_problems_are_flagged():
    class Spec:
        expects_mma = True
    row = {"error": None, "stack": 8, "local": 0, "shared": 300 * 1024, "tensor_cores": "-"}
    problems = report._problems(row, Spec(), 90)
    assert any("spills" in p for p in problems)
    assert any("shared memory" in p for p in problems)
    assert any("tensor-core" in p for p in problems)
    assert report._problems({"error": "CompilationError: boom"}, Spec(), 80) == ["compile failed: CompilationError: boom"]


def test_missing_modules_are_noted():
    specs, notes = report.load_specs(True, ["kernels.no_such_module"])
    assert specs == [] and notes == ["kernels.no_such_module: module not found, skipped"]
