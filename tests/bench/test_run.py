"""bench/run.py end to end on CPU (a shrunken quick run: tests/jobs.py), and the FLOP/MFU/roofline
formulas by hand."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import decode_suite, roofline, static_suite, train_suite
from bench.common import RunContext
from gpt import GPT, GPTConfig

from tests.jobs import SUITES

REPO = Path(__file__).resolve().parents[2]
PLOTS = ("kernels_gbps.png", "attention_tflops.png", "train_tokens_per_s.png", "decode_tokens_per_s.png",
         "roofline_estimates.png", "dist_scaling.png")


def test_suite_all_is_every_suite_but_serve():
    """The default, `--suite all`, runs each of these (the shared run below names all but loss, which
    test_loss_suite.py runs through bench/run.py); serve only when named."""
    from bench.run import SUITES, parse_args
    assert SUITES == ("kernels", "train", "decode", "static", "dist", "data", "loss")
    assert parse_args([]).suites == parse_args(["--suite", "all"]).suites == list(SUITES)
    assert parse_args(["--suite", "serve,loss"]).suites == ["serve", "loss"]


def test_results_json_has_machine_command_and_every_suite(quick_run):
    _, doc, _ = quick_run
    for key in ("schema", "command", "argv", "machine", "settings", "calibration", "results", "plots", "notes",
                "summary", "seconds"):
        assert key in doc, key
    m = doc["machine"]
    for key in ("cpu", "cpu_cores", "torch", "triton", "python", "gpu", "git_commit"):
        assert key in m, key
    assert m["torch"] == torch.__version__
    assert "bench/run.py" in doc["command"] and "--quick" in doc["argv"]
    assert doc["calibration"]["kind"] == "measured" and doc["calibration"]["copy_gbps"] > 0
    assert set(doc["results"]) == set(SUITES) == {"kernels", "train", "decode", "static", "dist", "data"}
    for suite, records in doc["results"].items():
        assert records, suite
        for r in records:  # every number says where it comes from
            assert r["kind"] in ("measured", "estimated"), (suite, r)


def test_each_suite_measured_what_it_should(quick_run):
    _, doc, _ = quick_run
    res = doc["results"]
    kern = [r for r in res["kernels"] if "median_ms" in r]
    assert {r["op"] for r in kern} == {"rms_norm", "rms_norm_residual", "rope", "swiglu", "attention",
                                       "decode_attention"}
    assert {r["provider"] for r in kern} == {"torch", "sdpa"}  # CPU, --no-compile: no triton, no compile
    for r in kern:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["gbps"] > 0
    train = res["train"]
    assert {(r["dtype"], r["compile"]) for r in train} == {("float32", False), ("bfloat16", False)}
    for r in train:
        assert r["batch"] == 2 and r["seq"] == 32 and r["tokens_per_s"] > 0 and math.isfinite(r["final_loss"])
        assert r["peak_memory_mb"] > 0 and "RSS" in r["memory_kind"]
    gen = [r for r in res["decode"] if r["test"] == "generate"]
    # --no-compile: the eager rows only (recomputing the window at batch 1), each with its roofline fraction
    assert {(r["mode"], r["batch"], r["kv_cache"]) for r in gen} == {("eager", 1, True), ("eager", 1, False),
                                                                       ("eager", 8, True)}
    assert all(r["pct_copy_bw"] > 0 for r in gen if r["kv_cache"])
    assert [r["context"] for r in res["decode"] if r["test"] == "context"] == [16, 16]
    compiled = [r for r in res["static"] if r.get("table") == "compile"]
    assert {r["kernel"] for r in compiled} == {"_rms_norm_fwd_kernel", "attention_fwd"}
    assert {r["kind"] for r in res["static"] if r.get("table") == "roofline"} == {"estimated"}
    dist = [r for r in res["dist"] if r["table"] == "measured"]
    assert {(r["world_size"], r["parallel"]) for r in dist} == {(1, "none"), (2, "ddp"), (2, "fsdp")}
    for r in dist:  # --batch-size and --seq-len are per rank
        assert r["kind"] == "measured" and r["batch_per_rank"] == 2 and r["seq"] == 32 and r["tokens_per_s"] > 0
    assert {(r["preset"], r["kind"]) for r in res["dist"] if r["table"] == "estimated"} == {("tiny", "estimated")}
    prep = [r for r in res["data"] if r["test"] == "prepare"]
    assert {(r["format"], r["input_mb"], r["workers"]) for r in prep} == {("jsonl", 1, 1), ("jsonl", 1, 2)}
    for r in prep:  # both worker counts tokenized the same corpus into the same number of tokens
        assert r["tokens"] == prep[0]["tokens"] > 200_000 and r["peak_pss_mb"] > 0 and r["disk_bytes_per_token"] > 2
    loader = [r for r in res["data"] if r["test"] == "loader"]
    assert {(r["batching"], r["block_size"]) for r in loader} == {(m, T) for m in ("windows", "documents")
                                                                    for T in (256, 1024, 2048)}
    assert all((r["cropped_pct"] is None) == (r["batching"] == "windows") for r in loader)


def test_stdout_tables_plots_and_final_json_line(quick_run):
    stdout, doc, out = quick_run
    assert "Triton kernel numbers need a CUDA GPU" in stdout
    for title in ("kernels (MEASURED", "train: full step", "decode: greedy generation", "ESTIMATED best-case roofline",
                  "dist: data-parallel training step on CPU ranks", "dist: ESTIMATED data-parallel scaling",
                  "data preparation: python -m train.prepare", "loader: batches of 8 rows"):
        assert title in stdout, title
    if importlib.util.find_spec("datasets"):   # --data-baseline: nanoGPT's method needs the datasets package
        assert "baseline: nanoGPT's prepare.py method" in stdout
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary == doc["summary"]
    assert summary["results"] == str(out / "results.json")
    for name in PLOTS:
        path = out / name
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(doc["plots"]) == sorted(PLOTS)


def test_measured_bytes_use_the_roofline_formula(quick_run):
    """RMSNorm forward at 64 rows x 4096 (bf16): one read of x and w, one write of y."""
    _, doc, _ = quick_run
    r = next(r for r in doc["results"]["kernels"] if r["op"] == "rms_norm" and r["direction"] == "fwd")
    assert r["bytes"] == 2 * 64 * 4096 * 2 + 4096 * 2
    assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] / 1e3) / 1e9)


def test_train_mfu_matches_a_hand_count_for_tiny(quick_run):
    """tiny: 5 layers, d=384, 6 query / 2 KV heads of 64, SwiGLU hidden 1024, vocab 8192, tied embedding."""
    _, doc, _ = quick_run
    d, layers, vocab, hidden, heads, kv_heads, head_dim = 384, 5, 8192, 1024, 6, 2, 64
    per_block = (2 * d                                   # two RMSNorm weights
                 + d * (heads + 2 * kv_heads) * head_dim  # fused q, k, v projection
                 + heads * head_dim * d                  # attention output projection
                 + d * 2 * hidden + hidden * d)          # SwiGLU: [gate | up], down
    params = vocab * d + layers * per_block + d          # embedding (= lm_head), blocks, final norm
    assert params == 11_014_272
    for r in doc["results"]["train"]:
        flops = 6 * params + 12 * layers * heads * head_dim * r["seq"]
        assert r["params"] == params and r["flops_per_token"] == flops
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / (r["peak_tflops"] * 1e12))


def test_param_count_and_mfu_hand_count_small_config():
    """The FLOP formula itself is checked against PyTorch's FLOP counter (tests/gpt/test_config.py)."""
    cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16)
    model = GPT(cfg)
    # hidden = 2/3 * 4 * 32 = 85.3 -> rounded up to a multiple of 64 = 128
    per_block = 32 + 32 * 64 + 32 * 32 + 32 + 32 * 256 + 128 * 32   # = 15,424
    params = 64 * 32 + 2 * per_block + 32                           # = 32,928
    assert model.num_params() == params == 32_928
    # 1,000 tokens/s at 209,856 FLOPs per token on a 1 GFLOP/s machine: 20.9856%
    assert train_suite.mfu(209_856, 1000.0, 1e9) == pytest.approx(0.209856)


def test_roofline_rms_norm_forward_h100_by_hand():
    """rows=4096, D=4096, bf16: read x + w, write y -> 2*4096*4096*2 + 4096*2 bytes at 3.35 TB/s."""
    nbytes = 2 * 4096 * 4096 * 2 + 4096 * 2
    cost = roofline.rms_norm_cost(4096, 4096, 2, direction="fwd")
    assert cost.bytes == nbytes and cost.flops == 0
    est = roofline.estimate(cost, roofline.GPUS["H100"])
    assert est["time_us"] == pytest.approx(nbytes / 3.35e12 * 1e6)  # ~20.0 us
    assert est["bound"] == "memory" and est["kind"] == "estimated"
    assert est["gbps"] == pytest.approx(3350.0)
    # The static suite reports exactly this number for its representative RMSNorm forward.
    rec = next(r for r in static_suite.roofline_estimates()
               if r["op"] == "rms_norm" and r["direction"] == "fwd" and r["gpu"] == "H100 SXM")
    assert rec["bytes"] == nbytes and rec["time_us"] == pytest.approx(nbytes / 3.35e12 * 1e6)


def test_attention_flops_by_hand():
    B, H, T, D = 4, 16, 4096, 64
    fwd = 4 * B * H * T * T * D // 2   # causal: half the score matrix
    assert roofline.attention_flops(B, H, T, T, D, causal=True, direction="fwd") == fwd
    assert roofline.attention_flops(B, H, T, T, D, causal=True, direction="bwd") == fwd * 5 // 2
    assert roofline.attention_flops(B, H, T, T, D, causal=False, direction="fwd") == 2 * fwd
    # decode (Tq=1 < Tk): no causal halving
    assert roofline.attention_flops(8, H, 1, T, D, causal=True) == 4 * 8 * H * T * D
    # A100: 137.4 GFLOP at 312 TFLOP/s is compute-bound
    est = roofline.estimate(roofline.attention_cost(B, H, 4, T, T, D, 2), roofline.GPUS["A100"])
    assert est["bound"] == "compute" and est["time_us"] == pytest.approx(fwd / 312e12 * 1e6)


def test_kernels_flag_is_checked_before_any_work(tmp_path, capsys):
    """In a process of its own (here TRITON_INTERPRET=1 would let the kernels run on the CPU), then an unknown
    choice through the same main(argv) in this process: exit status 2, one message, no output directory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--device", "cpu", "--kernels", "triton",
                           "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "error: kernels='triton' cannot run here" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    from bench.run import main
    with pytest.raises(SystemExit) as exit:
        main(["--device", "cpu", "--kernels", "fast", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "invalid choice: 'fast'" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_kernel_modes_default_to_every_implementation_that_runs_here():
    from bench.run import kernel_modes
    assert kernel_modes(None, torch.device("cpu")) == ["torch"]
    assert kernel_modes("auto", torch.device("cpu")) == ["torch"]


def test_a_quick_run_compiles_one_decoder_unless_presets_are_named():
    """Each compiled decoder costs about a minute on 2 cores from an empty compile cache: the default quick
    run compiles one (the first preset at batch 1), --full or --preset every one asked for."""
    presets = ["shakespeare_cpu", "tiny", "small"]
    ctx = lambda quick, named=None: RunContext(torch.device("cpu"), quick, torch.bfloat16, ["torch"], presets=named)
    assert decode_suite.compiled_runs(presets, ctx(True)) == (["shakespeare_cpu"], (1,))
    assert decode_suite.compiled_runs(presets, ctx(False)) == (presets, decode_suite.BATCHES)
    assert decode_suite.compiled_runs(["small"], ctx(True, ["small"])) == (["small"], decode_suite.BATCHES)
