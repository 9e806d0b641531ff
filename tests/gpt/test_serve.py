"""python -m gpt.serve: the OpenAI completions API on 127.0.0.1 (tests/gpt/serving.py starts and stops
every server here), checked with the official `openai` client and plain HTTP: answers equal the sampler's,
bad input is a 4xx naming the field, clients that leave free their slots, 32 clients on 4 slots all get
their answers, memory stays flat over 500 requests, and SIGTERM/Ctrl-C drain or cancel and exit with 0."""
from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import socket
import time

import pytest
import torch

from tests.gpt.serving import (CHARS, SUCCESSOR_TOKENIZER, LiveServer, ServerProcess, random_model, save_checkpoint,
                               slow_down, successor_gpt, successor_text)

pytestmark = pytest.mark.requires("starlette", "uvicorn", "httpx")

httpx = pytest.importorskip("httpx")


def wait_until(condition, timeout: float, what: str) -> float:
    """Poll until condition() holds; the seconds it took. Fails after `timeout`."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - t0


def sse_events(response) -> list:
    """The JSON values of a streamed response's `data:` lines, "[DONE]" as the string."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def successor_server():
    with LiveServer(successor_gpt(block_size=64), SUCCESSOR_TOKENIZER, slots=4, max_tokens=200) as server:
        yield server


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    model, tok = random_model()
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("serve") / "ckpt.pt")


# -- answers ----------------------------------------------------------------------------------------------

def sampler_greedy(ckpt: str, prompts: list[str], max_tokens: int, tmp_path, capsys) -> list[str]:
    """python -m gpt.sample's greedy continuation of each prompt (one run, --prompts-file)."""
    from gpt import sample
    path = tmp_path / "prompts.txt"
    path.write_text("".join(p + "\n" for p in prompts))
    assert sample.main(["--ckpt", ckpt, "--prompts-file", str(path), "--max-tokens", str(max_tokens),
                        "--temperature", "0", "--device", "cpu", "--dtype", "float32", "--kernels", "torch",
                        "--no-compile"]) == 0
    blocks = re.split(r"^--- prompt \d+, sample 1 ---\n", capsys.readouterr().out, flags=re.M)[1:]
    assert len(blocks) == len(prompts)
    return [b.removesuffix("\n")[len(p):] for p, b in zip(prompts, blocks)]


def test_greedy_answers_equal_the_sampler_cli(text_ckpt, tmp_path, capsys):
    from gpt.checkpoint import load_model
    prompts = ["ROMEO:", "To be, or not", "hello world"]
    expected = sampler_greedy(text_ckpt, prompts, 40, tmp_path, capsys)
    model, tok, _ = load_model(text_ckpt)
    with LiveServer(model, tok, slots=2) as server:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda p: httpx.post(f"{server.url}/v1/completions", json={
                "prompt": p, "max_tokens": 40, "temperature": 0}, timeout=60).json(), prompts))
    assert [a["choices"][0]["text"] for a in answers] == expected
    assert len(set(expected)) == 3 and all(len(set(e)) > 3 for e in expected)   # not a degenerate model
    assert [a["usage"] for a in answers] == [{"prompt_tokens": len(p), "completion_tokens": 40,
                                              "total_tokens": len(p) + 40} for p in prompts]


def test_the_official_openai_client_works_unchanged(successor_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{successor_server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="ab", max_tokens=5, temperature=0)
    assert r.choices[0].text == "cdefg" and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 5, 7)
    r = client.completions.create(model="tiny", prompt=["a", "k"], max_tokens=6, temperature=0, n=2, stop=["ef", "n"])
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [
        (0, "bcd", "stop"), (1, "bcd", "stop"), (2, "lm", "stop"), (3, "lm", "stop")]
    chunks = list(client.completions.create(model="tiny", prompt="a", max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "bcde"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert client.completions.create(model="tiny", prompt="a", max_tokens=3, echo=True,
                                     temperature=0).choices[0].text == "abcd"
    r = client.completions.create(model="tiny", prompt=[[3], [CHARS.index("k"), CHARS.index("l")]], max_tokens=2,
                                  temperature=0)                 # prompts as token ids: "b" and "kl"
    assert [c.text for c in r.choices] == ["cd", "mn"] and r.usage.prompt_tokens == 3
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="a", max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a")


def test_seeded_sampling_repeats_and_n_choices_differ():
    model, tok = random_model()
    with LiveServer(model, tok, slots=3) as server:
        def ask(seed):
            return httpx.post(f"{server.url}/v1/completions", timeout=60, json={
                "prompt": "ROMEO:", "max_tokens": 24, "temperature": 1.5, "n": 3, "seed": seed}).json()
        first, again, other = ask(7), ask(7), ask(8)
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]
    assert len(set(texts)) == 3
    assert texts != [c["text"] for c in other["choices"]]


def test_streamed_chunks_are_one_event_per_token_and_sum_to_the_answer(successor_server):
    with httpx.stream("POST", f"{successor_server.url}/v1/completions", timeout=30, json={
            "prompt": "a", "max_tokens": 6, "temperature": 0, "stream": True, "n": 2}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    for index in (0, 1):
        mine = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == "bcdefg"
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])


# -- bad input ----------------------------------------------------------------------------------------------

BAD = [  # (body, status, param)
    (b'{"prompt": "a", ', 400, None),                          # malformed JSON
    (b'\xff\xfe{"prompt": "a"}', 400, None),                    # not UTF-8
    (b'["a"]', 400, None),                                      # not an object
    (b'{"prompt": "a", "max_tokens": NaN}', 400, None),
    (b'{"prompt": "a", "temprature": 1}', 400, "temprature"),   # unknown field
    (b'{"max_tokens": 5}', 400, "prompt"),                      # missing
    (b'{"prompt": 5}', 400, "prompt"),
    (b'{"prompt": [1, "a"]}', 400, "prompt"),
    (b'{"prompt": []}', 400, "prompt"),
    (b'{"prompt": "a", "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 5.0}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": true}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": -1}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 1000000000000000000000}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 1e400}', 400, "max_tokens"),
    (b'{"prompt": "a", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "a", "temperature": -0.5}', 400, "temperature"),
    (b'{"prompt": "a", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "a", "top_k": 2.5}', 400, "top_k"),
    (b'{"prompt": "a", "n": 0}', 400, "n"),
    (b'{"prompt": "a", "n": 1000}', 400, "n"),
    (b'{"prompt": "a", "seed": -3}', 400, "seed"),
    (b'{"prompt": "a", "stop": 5}', 400, "stop"),
    (b'{"prompt": "a", "stop": [""]}', 400, "stop"),
    (b'{"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"prompt": "a", "stream": "yes"}', 400, "stream"),
    (b'{"prompt": "a", "stream_options": {"include_usage": true}}', 400, "stream_options"),
    (b'{"prompt": "a", "logprobs": 2}', 400, "logprobs"),
    (b'{"prompt": "a", "best_of": 3}', 400, "best_of"),
    (b'{"prompt": "a", "model": 3}', 400, "model"),
    (b'{"prompt": "a", "model": "other"}', 404, "model"),
    (b'{"prompt": "abc\\u20ac"}', 400, "prompt"),               # a character the tokenizer cannot encode
    (b'{"prompt": "ab\\ud800"}', 400, "prompt"),                # a lone surrogate
    (b'{"prompt": [3, 99]}', 400, "prompt"),                    # a token id outside the vocabulary
    (("{\"prompt\": \"" + "a" * 65 + "\"}").encode(), 400, "prompt"),   # over --max-prompt-tokens (64)
    (b"[" * 100000 + b"]" * 100000, 400, None),                 # nested too deeply
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[f"{i}-{b[:40]!r}" for i, (b, _, _) in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(successor_server, body, status, param):
    r = httpx.post(f"{successor_server.url}/v1/completions", content=body, timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert "Traceback" not in r.text and error["message"]
    if param is not None and status == 400:
        assert param in error["message"]


def test_bodies_over_the_limit_are_refused_and_the_server_lives_on():
    with LiveServer(successor_gpt(), SUCCESSOR_TOKENIZER, max_body_bytes=2048) as server:
        big = json.dumps({"prompt": "a", "user": "x" * 5000}).encode()
        r = httpx.post(f"{server.url}/v1/completions", content=big, timeout=10)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():             # no Content-Length: the limit is counted while the body arrives
            yield big[:1000]
            yield big[1000:]
        r = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=10)
        assert r.status_code == 413
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 2, "temperature": 0})
        assert r.json()["choices"][0]["text"] == "bc"


def test_more_choices_than_may_wait_is_a_503_overloaded():
    with LiveServer(successor_gpt(), SUCCESSOR_TOKENIZER, slots=1, max_queued=1) as server:
        body = {"prompt": "a", "max_tokens": 2, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json={**body, "n": 3}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        r = httpx.post(f"{server.url}/v1/completions", json={**body, "n": 2}, timeout=30)    # one runs, one waits
        assert [c["text"] for c in r.json()["choices"]] == ["bc", "bc"]


def test_routes_methods_and_health(successor_server):
    url = successor_server.url
    assert httpx.get(f"{url}/v1/completions").status_code == 405
    r = httpx.get(f"{url}/v1/chat")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models/tiny").json()["id"] == "tiny"
    assert httpx.get(f"{url}/v1/models/other").status_code == 404
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["slots"] == 4
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="prompt"' in page.text and 'src="/app.js"' in page.text
    assert "fetch(\"/v1/completions\"" in httpx.get(f"{url}/app.js").text


def test_a_model_that_fails_is_a_500_or_an_error_event_and_the_server_goes_on():
    model = successor_gpt(block_size=64)
    failing = [True]

    def fail(module, args):
        if failing[0]:
            raise RuntimeError("out of memory (a test)")
    model.blocks[0].register_forward_pre_hook(fail)
    with LiveServer(model, SUCCESSOR_TOKENIZER) as server:
        body = {"prompt": "a", "max_tokens": 3, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and "Traceback" not in r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "engine_error"
        assert "out of memory (a test)" in error["message"]
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_error"
        failing[0] = False
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"] == "bcd"


# -- clients that leave ---------------------------------------------------------------------------------------

def test_a_client_that_disconnects_mid_stream_frees_its_slot_within_a_step():
    model = successor_gpt(block_size=64)
    step = 0.05
    slow_down(model, step)
    with LiveServer(model, SUCCESSOR_TOKENIZER, slots=1, max_tokens=500) as server:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=30, json={
                "prompt": "a", "max_tokens": 500, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            seen = 0
            while seen < 3:                                # three chunks
                seen += next(lines).startswith("data: ")
            [job] = server.service.jobs
            [request] = job.engine_requests
        left = time.monotonic()            # the connection is closed here
        # The engine's thread frees the slot, then emits the request's last event (its finish_reason): wait for both.
        wait_until(lambda: server.engine.busy() == 0 and request.finish_reason is not None, 5, "the slot freed")
        freed = time.monotonic() - left
        assert request.finish_reason == "cancelled"
        assert request.completion_tokens < 3 + 4 + int(freed / step) + 2, (request.completion_tokens, freed)
        assert not server.service.jobs
        # The one slot serves the next request at once.
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "k", "max_tokens": 2, "temperature": 0},
                       timeout=30)
        assert r.json()["choices"][0]["text"] == "lm"


def test_a_client_that_disconnects_while_waiting_for_a_whole_answer_is_cancelled():
    model = successor_gpt(block_size=64)
    slow_down(model, 0.05)
    with LiveServer(model, SUCCESSOR_TOKENIZER, slots=1, max_tokens=500) as server:
        body = json.dumps({"prompt": "a", "max_tokens": 500, "temperature": 0}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: server.engine.busy() == 1, 10, "the request running")
        wait_until(lambda: server.engine.busy() == 0 and not server.service.jobs, 5, "the slot freed")


# -- load -------------------------------------------------------------------------------------------------------

def test_32_concurrent_clients_on_4_slots_all_get_complete_correct_answers(text_ckpt, tmp_path, capsys):
    from gpt.checkpoint import load_model
    names, words = ("ROMEO", "JULIET", "HAMLET", "KING", "LEAR", "PUCK", "IAGO", "VIOLA"), ("o", "my", "to be", "x")
    prompts = [f"{names[i % 8]}: {words[i // 8]}" for i in range(32)]
    lengths = [8 + (i * 7) % 40 for i in range(32)]          # 8 to 47 tokens: slots free and refill at all times
    reference = sampler_greedy(text_ckpt, prompts, max(lengths), tmp_path, capsys)
    assert len(set(reference)) == 32
    model, tok, _ = load_model(text_ckpt)

    def ask(i):
        body = {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0, "stream": i % 2 == 1}
        url = f"{server.url}/v1/completions"
        if not body["stream"]:
            return httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        return "".join(e["choices"][0]["text"] for e in events[:-1])

    with LiveServer(model, tok, slots=4) as server:
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, range(32), timeout=120))
        assert time.monotonic() - t0 < 120
        health = httpx.get(f"{server.url}/health").json()
    # Greedy, one character per token: the answer for n tokens is the first n characters of the sampler's.
    assert answers == [ref[:n] for ref, n in zip(reference, lengths)]
    assert (health["busy"], health["waiting"], health["requests_in_flight"]) == (0, 0, 0)
    assert health["requests_served"] == 32


def test_memory_does_not_grow_across_500_requests(tmp_path):
    ckpt = save_checkpoint(successor_gpt(block_size=64), SUCCESSOR_TOKENIZER, tmp_path / "succ.pt")
    with ServerProcess("--ckpt", ckpt, "--slots", "4", "--dtype", "float32") as server, \
            httpx.Client(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=8)) as client:
        def ask(i):
            body = {"prompt": CHARS[1 + i % 15], "max_tokens": 3, "temperature": 0, "stream": i % 3 == 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.text

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(ask, range(100)))                      # warm up: allocator pools, caches
            before = server.rss_kb()
            list(pool.map(ask, range(100, 500)))
        after = server.rss_kb()
        health = client.get("/health").json()
        assert health["requests_served"] == 500 and health["requests_in_flight"] == 0
        rc, _ = server.stop()
    assert after - before < 8 * 1024, f"RSS grew by {(after - before) / 1024:.1f} MB over 400 requests"
    assert rc == 0


# -- shutting down ----------------------------------------------------------------------------------------------

def stream_in_thread(url: str, body: dict):
    """Start a streaming request on another thread; returns (future of its events, event set at the first chunk)."""
    import threading
    started = threading.Event()

    def run():
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    events.append(data if data == "[DONE]" else json.loads(data))
                    started.set()
        return events

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future, started


@pytest.fixture(scope="module")
def slow_ckpt(tmp_path_factory):
    """A checkpoint whose model takes a while per token: a wider successor model (block 512) to decode
    400 tokens."""
    return save_checkpoint(successor_gpt(block_size=512), SUCCESSOR_TOKENIZER,
                           tmp_path_factory.mktemp("serve") / "succ512.pt")


def test_sigterm_drains_the_requests_in_flight_and_exits_with_0(slow_ckpt):
    with ServerProcess("--ckpt", slow_ckpt, "--drain-timeout", "60", "--max-tokens", "400") as server:
        future, started = stream_in_thread(server.url, {"prompt": "a", "max_tokens": 400, "temperature": 0})
        assert started.wait(30)
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refused(server.url), 10, "new connections refused")
        events = future.result(timeout=60)
        rc, err = server.stop(None)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == successor_text("a", 400)
    assert rc == 0 and "Traceback" not in err, err
    assert "stopped (requests served: 1)" in err


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=5)
    except httpx.ConnectError:
        return True
    return False


def test_ctrl_c_past_the_drain_timeout_cancels_with_an_error_event_and_exits_with_0(slow_ckpt):
    with ServerProcess("--ckpt", slow_ckpt, "--drain-timeout", "0", "--max-tokens", "100000") as server:
        future, started = stream_in_thread(server.url, {"prompt": "a", "max_tokens": 100000, "temperature": 0})
        assert started.wait(30)
        rc, err = server.stop(signal.SIGINT)
        events = future.result(timeout=30)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"
    assert rc == 0 and "Traceback" not in err, err


# -- the command line -------------------------------------------------------------------------------------------

def test_cli_errors_are_one_line(tmp_path, text_ckpt, capsys):
    from gpt.serve.__main__ import main

    def error(*args) -> str:
        assert main(["--device", "cpu", "--port", "0", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        return err

    assert "does not exist" in error("--ckpt", str(tmp_path / "missing.pt"))
    assert "--slots must be at least 1" in error("--ckpt", text_ckpt, "--slots", "0")
    assert "--max-tokens must be at least 1" in error("--ckpt", text_ckpt, "--max-tokens", "0")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert "cannot listen on 127.0.0.1" in error("--ckpt", text_ckpt, "--port", str(busy.getsockname()[1]))


def test_the_compile_warm_up_prefills_every_bucket_and_samples_with_openais_steps():
    from gpt.generation.engine import Engine
    from gpt.serve.__main__ import WARM_SAMPLING, warm_up
    engine = Engine(successor_gpt(block_size=64), SUCCESSOR_TOKENIZER, slots=2)
    submitted = []
    submit = engine.submit
    engine.submit = lambda ids, params: submitted.append((len(ids), params)) or submit(ids, params)
    warm_up(engine, [2], max_prompt_tokens=40, block_size=64)
    assert [n for n, _ in submitted] == [16, 32, 64]      # the buckets up to 40 tokens, and block/2's re-prefill
    assert all(p.temperature == WARM_SAMPLING["temperature"] and p.top_p and p.frequency_penalty
               for _, p in submitted)
    assert engine.busy() == 0 and engine.waiting() == 0


def test_without_starlette_the_server_says_what_to_install(tmp_path, text_ckpt):
    from tests.test_optional_packages import finish, start_without
    r = finish(start_without(["starlette"], "-m", "gpt.serve", "--ckpt", text_ckpt, cwd=tmp_path))
    assert r.returncode == 2 and "pip install starlette" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.requires("safetensors")
def test_a_hugging_face_folder_serves_the_same_answers(tmp_path, text_ckpt):
    from gpt.checkpoint import load_model
    from gpt.hf import export_hf
    from gpt.serve.__main__ import build_parser, load
    model, tok, _ = load_model(text_ckpt)
    export_hf(model, tok, tmp_path / "hf")
    args = build_parser().parse_args(["--ckpt", str(tmp_path / "hf"), "--device", "cpu", "--dtype", "float32",
                                      "--kernels", "torch"])
    hf_model, hf_tok, dtype, line = load(args)
    assert dtype == torch.float32 and "loaded" in line
    body = {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0}
    texts = []
    for m, t in ((model, tok), (hf_model, hf_tok)):
        with LiveServer(m, t, slots=1) as server:
            texts.append(httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"])
    assert texts[0] == texts[1] and len(texts[0]) == 20
