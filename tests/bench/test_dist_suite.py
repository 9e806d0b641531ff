"""The `dist` suite: its GPU estimates checked by hand, and one shrunken measured run on 1 and 2 CPU ranks (bench/run.py's
quick run, tests/jobs.py)."""
import math

import pytest
import torch

from bench import dist_suite
from bench.common import RunContext

from tests.jobs import BATCH, SEQ

P = 1_000_000  # a made-up parameter count


def test_ddp_bytes_are_a_ring_all_reduce_of_fp32_gradients():
    # 2 (N-1)/N x 4 bytes x P: N = 4 -> 2 x 0.75 x 4e6 = 6e6; N = 16 -> 2 x 15/16 x 4e6 = 7.5e6
    assert dist_suite.ddp_bytes_per_gpu(P, 4) == pytest.approx(6_000_000)
    assert dist_suite.ddp_bytes_per_gpu(P, 16) == pytest.approx(7_500_000)
    assert dist_suite.ddp_bytes_per_gpu(P, 1) == 0


def test_fsdp_bytes_by_hand():
    # One micro-step, no root: two bf16 all-gathers of P and one fp32 reduce-scatter of P, N = 4:
    # 2 x 0.75 x 2 x 1e6 + 0.75 x 4 x 1e6 = 3e6 + 3e6
    assert dist_suite.fsdp_bytes_per_gpu(P, 4) == pytest.approx(6_000_000)
    # A root of 200,000 parameters gathered once per micro-step, blocks (800,000) twice, 2 micro-steps:
    # gathered = 2 x (2 x 800,000 + 200,000) = 3.6e6 -> 0.75 x 2 x 3.6e6 + 0.75 x 4 x 1e6 = 5.4e6 + 3e6
    assert dist_suite.fsdp_bytes_per_gpu(P, 4, root_params=200_000, micro_steps=2) == pytest.approx(8_400_000)


def test_compute_time_and_efficiency_bounds_by_hand():
    # 6e6 FLOPs/token x 10,000 tokens at 50% of 1 PFLOP/s: 6e10 / 5e14 = 120 us
    assert dist_suite.compute_seconds(6e6, 10_000, peak_flops=1e15, mfu=0.5) == pytest.approx(1.2e-4)
    assert dist_suite.efficiency_bounds(3.0, 1.0) == pytest.approx((0.75, 1.0))       # comm hidden if overlapped
    assert dist_suite.efficiency_bounds(1.0, 3.0) == pytest.approx((0.25, 1 / 3))     # comm-bound either way


def test_constants_are_the_stated_datasheet_numbers():
    assert dist_suite.NVLINK4_BYTES_PER_S == 450e9 and dist_suite.IB_NDR_BYTES_PER_S == 50e9
    assert dist_suite.H100_BF16_FLOPS == 989e12 and dist_suite.ASSUMED_MFU == 0.4


def test_tiny_estimate_by_hand():
    """tiny: 11,014,272 parameters (tests/bench/test_run.py counts them), of which the tied embedding
    8192 x 384 and the final norm's 384 sit outside the blocks; training defaults 32 x 256 tokens."""
    recs = {(r["gpus"], r["parallel"]): r for r in dist_suite.estimates(["tiny"])}
    assert set(recs) == {(8, "ddp"), (8, "fsdp"), (16, "ddp"), (16, "fsdp")}
    assert all(r["kind"] == "estimated" for r in recs.values())
    params, root, tokens = 11_014_272, 8192 * 384 + 384, 32 * 256
    flops_per_token = 6 * params + 12 * 5 * 6 * 64 * 256
    compute = flops_per_token * tokens / (989e12 * 0.4)  # ~1.49 ms
    r = recs[(8, "ddp")]
    assert (r["params"], r["root_params"], r["tokens_per_gpu_step"]) == (params, root, tokens)
    assert r["bytes_per_gpu"] == pytest.approx(2 * 7 / 8 * 4 * params)
    assert r["comm_ms"] == pytest.approx(2 * 7 / 8 * 4 * params / 450e9 * 1e3)   # ~0.171 ms over NVLink
    assert r["compute_ms"] == pytest.approx(compute * 1e3)
    r = recs[(16, "fsdp")]
    fsdp_bytes = 15 / 16 * 2 * (2 * (params - root) + root) + 15 / 16 * 4 * params
    comm = fsdp_bytes / 50e9  # ~1.53 ms over InfiniBand: slower than the compute
    assert r["bytes_per_gpu"] == pytest.approx(fsdp_bytes)
    assert r["efficiency_no_overlap"] == pytest.approx(compute / (compute + comm))
    assert r["efficiency_full_overlap"] == pytest.approx(compute / comm) and r["efficiency_full_overlap"] < 1
    assert r["tokens_per_s_high"] == pytest.approx(16 * tokens / comm)


def test_derived_columns_by_hand():
    rows = [dict(preset="tiny", world_size=1, batch_per_rank=2, seq=10, step_s=0.1),
            dict(preset="tiny", world_size=2, batch_per_rank=2, seq=10, step_s=0.125, nosync_step_s=0.1),
            dict(preset="tiny", world_size=2, batch_per_rank=2, seq=10, step_s=0.1, nosync_step_s=0.11)]
    one, ddp, noisy = dist_suite.derive(rows)
    assert one["tokens_per_s"] == pytest.approx(200) and one["scaling_efficiency"] == pytest.approx(1)
    assert "exposed_comm_share" not in one
    assert ddp["tokens_per_s"] == pytest.approx(320) and ddp["tokens_per_s_per_rank"] == pytest.approx(160)
    assert ddp["scaling_efficiency"] == pytest.approx(0.8) and ddp["exposed_comm_share"] == pytest.approx(0.2)
    assert noisy["exposed_comm_share"] == 0.0  # no-sync slower than sync (noise): clamped, not negative


def test_measured_run_on_one_and_two_cpu_ranks(quick_run):
    """The real thing, shrunken: torchrun with 1 and 2 gloo ranks, as bench/run.py's quick run measures them
    (tests/jobs.py: --batch-size and --seq-len per rank; test_run.py checks the rest of that run)."""
    _, doc, _ = quick_run
    assert not [n for n in doc["notes"] if n.startswith(("dist", "suite dist"))], doc["notes"]
    rows = [r for r in doc["results"]["dist"] if r["table"] == "measured"]
    by = {(r["world_size"], r["parallel"]): r for r in rows}
    assert len(by) == len(rows) and set(by) == {(1, "none"), (2, "ddp"), (2, "fsdp")}
    steps = dist_suite.QUICK_STEPS[1]
    for (w, mode), r in by.items():
        assert r["kind"] == "measured" and r["table"] == "measured"
        assert r["threads_per_rank"] == 1 and r["steps_timed"] == steps and len(r["step_s_all"]) == steps
        assert r["tokens_per_step"] == w * BATCH * SEQ and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"])
        assert r["scaling_efficiency"] > 0 and math.isfinite(r["final_loss"])
        assert r["model"] == dist_suite.QUICK_MODEL and r["params"] < 2_000_000
    assert by[(1, "none")]["backend"] is None and by[(2, "ddp")]["backend"] == "gloo"
    assert 0 <= by[(2, "ddp")]["exposed_comm_share"] < 1 and by[(2, "ddp")]["nosync_step_s"] > 0
    assert "exposed_comm_share" not in by[(2, "fsdp")] and "exposed_comm_share" not in by[(1, "none")]


def test_a_failed_job_becomes_an_error_row_and_a_note(monkeypatch):
    def fail(world_size, args, timeout):
        raise RuntimeError(f"{world_size} ranks: torchrun exited 1; output: boom")

    monkeypatch.setattr(dist_suite, "launch", fail)
    ctx = RunContext(device=torch.device("cpu"), quick=True, dtype=torch.bfloat16, kernels=["torch"])
    rows = dist_suite.measured(ctx)
    assert [(r["world_size"], r["kind"], "boom" in r["error"]) for r in rows] == [(1, "measured", True),
                                                                                  (2, "measured", True)]
    assert len(ctx.notes) == 2 and "failed" in ctx.notes[0]
    dist_suite.print_tables(rows + dist_suite.estimates(["tiny"]), ctx)  # error rows are left out, no crash
