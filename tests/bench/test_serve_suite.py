"""The `serve` suite's parts on a tiny checkpoint: its requests, one measured level pair against real servers
on 127.0.0.1, the summary statistics, and the runner accepting `--suite serve`."""
import pytest
import torch

from bench import serve_suite
from bench.common import RunContext
from tests.gpt.serving import SUCCESSOR_TOKENIZER, save_checkpoint, successor_gpt

pytestmark = pytest.mark.requires("starlette", "uvicorn")

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 50


def test_requests_are_streamed_seeded_and_cut_from_the_text():
    reqs = serve_suite.make_requests(TEXT, 8, 12)
    assert len(reqs) == 8 and len({r["prompt"] for r in reqs}) > 1
    assert all(r["prompt"] in TEXT and 32 <= len(r["prompt"]) <= 96 for r in reqs)
    assert [r["seed"] for r in reqs] == list(range(8))
    assert all(r["stream"] and r["stream_options"] == {"include_usage": True} and r["max_tokens"] == 12 for r in reqs)


def test_quantiles_and_summary_by_hand():
    results = [{"ttft": 0.1, "gaps": [0.01, 0.03], "tokens": 3}, {"ttft": 0.3, "gaps": [0.02, 0.04], "tokens": 3}]
    s = serve_suite.summarize(results, wall=2.0)
    assert s["tokens"] == 6 and s["tokens_per_s"] == 3.0 and s["requests"] == 2
    assert s["ttft_p50_ms"] == pytest.approx(200) and s["token_p50_ms"] == pytest.approx(25)
    assert s["ttft_p95_ms"] == pytest.approx(290) and s["token_p95_ms"] == pytest.approx(38.5)


def test_one_level_pair_against_real_servers(tmp_path):
    ckpt = save_checkpoint(successor_gpt(block_size=64), SUCCESSOR_TOKENIZER, tmp_path / "succ.pt")
    requests = [{"prompt": "abc"[: 1 + i % 3], "max_tokens": 5, "temperature": 0.8, "seed": i, "stream": True,
                 "stream_options": {"include_usage": True}} for i in range(6)]
    ctx = RunContext(device=torch.device("cpu"), quick=True, dtype=torch.float32, kernels=["torch"])
    records = serve_suite.measure(ckpt, "succ", requests, ctx, levels=(1, 2))
    assert [(r["clients"], r["slots"]) for r in records] == [(1, 1), (2, 2)]
    for r in records:
        assert r["kind"] == "measured" and r["server_exit"] == 0 and r["server_threads"] >= 1
        assert r["requests"] == 6 and r["tokens"] == 30 and r["tokens_per_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p95_ms"] and 0 < r["token_p50_ms"] <= r["token_p95_ms"]
    assert records[0]["speedup"] == 1.0 and records[1]["speedup"] > 0
    serve_suite.print_tables(records, ctx)


def test_the_runner_takes_the_serve_suite_only_when_named():
    from bench.run import parse_args
    assert parse_args(["--suite", "serve"]).suites == ["serve"]
    assert "serve" not in parse_args([]).suites
