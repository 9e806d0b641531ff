"""The OpenAI completions API as this server speaks it: a request body checked field by field, the response
and stream-chunk objects, server-sent-event framing and the error object. Functions of JSON values and the
tokenizer only: no web framework, no engine.

A request that cannot be served is an `APIError` whose body is OpenAI's error object,
`{"error": {"message", "type", "param", "code"}}`, with `param` naming the field at fault. Checked:
malformed or non-UTF-8 JSON, a body that is not an object, unknown fields, wrong types (a boolean is not a
number; 16.0 is not an integer), values out of range, `max_tokens` above the server's cap, prompts longer
than its prompt cap or holding characters the tokenizer cannot encode (or lone surrogates, which no
encoding can), token ids outside the vocabulary, and OpenAI fields whose other values this server does not
implement (`logprobs`, `suffix`, `logit_bias`, a `best_of` other than `n`).

Beyond OpenAI's fields, the sampler's other settings are accepted under the names vLLM uses for them:
`top_k`, `min_p`, `repetition_penalty` (the official client sends them with `extra_body=`).
"""
from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field

MAX_CHOICES = 64        # prompts x n in one request
MAX_STOP = 4            # stop strings, as OpenAI allows
MAX_SEED = 2 ** 63 - 1


class APIError(Exception):
    """A request the server answers with an HTTP error status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_object(self.message, self.kind, self.param, self.code)


def error_object(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: the server's caps (--max-tokens, --max-prompt-tokens) and the model."""

    max_tokens: int
    max_prompt_tokens: int
    vocab_size: int
    model_names: tuple[str, ...] = ()      # names the `model` field may give (empty: any)


@dataclass
class CompletionRequest:
    """A checked request: the prompts as token ids, the sampling settings (the fields of
    gpt.generation.engine.RequestParams, without seed and stop), and how to answer."""

    prompts: list[list[int]]
    prompt_texts: list[str]                 # for echo
    n: int = 1
    max_tokens: int = 16
    sampling: dict = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    echo: bool = False

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def seed_of(self, choice: int) -> int | None:
        """Choice i of a seeded request samples with seed + i (mod 2^63): `n` choices differ, and a request
        repeated with the same seed gives the same choices."""
        return None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1)


# -- reading the body -----------------------------------------------------------------------------------

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes):
    """The JSON value of a request body; APIError 400 for anything else."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8 (byte {e.start}); send JSON in UTF-8",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    except ValueError as e:   # json.JSONDecodeError is one
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise APIError(400, f"the request body is not valid JSON ({reason}{where}); send a JSON object",
                       code="invalid_json") from None


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _integer(body: dict, name: str, default, lo: int | None = None, hi: int | None = None, hint: str = ""):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"must be an integer, got {_kind(v)}", "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}" if lo is not None else f"<= {hi}"
        raise _bad(name, f"must be {rng}{hint}, got {v}")
    return v


def _number(body: dict, name: str, default, ok, valid: str):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"must be a number, got {_kind(v)}", "invalid_type")
    if not math.isfinite(v) or not ok(v):
        raise _bad(name, f"must be {valid}, got {v}")
    return float(v)


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"must be true or false, got {_kind(v)}", "invalid_type")
    return v


def _check_encodable(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(param, f"holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), "
                          f"which is not a character; send valid Unicode", "unencodable_characters") from None


# Fields that OpenAI defines and this server accepts only with the value that means "not used".
_UNSUPPORTED = {
    "logprobs": "log probabilities are not returned by this server; leave logprobs out",
    "suffix": "insertion (suffix) is not supported by this server; leave suffix out",
    "logit_bias": "logit_bias is not supported by this server; leave it out or send {}",
}
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
          "echo", "frequency_penalty", "presence_penalty", "user", "best_of", *_UNSUPPORTED,
          "top_k", "min_p", "repetition_penalty")


def parse_completion_request(value, limits: Limits, tokenizer, encode) -> CompletionRequest:
    """A checked CompletionRequest from a parsed JSON body; APIError naming the field otherwise.
    encode(text) -> ids is how a prompt string becomes tokens (the sampler's rule for an empty prompt)."""
    if not isinstance(value, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_kind(value)}", code="invalid_json")
    body = value
    for name in body:
        if name not in FIELDS:
            raise _bad(name, f"unknown field; this server takes {', '.join(FIELDS)}", "unknown_field")
    for name, why in _UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and v != {} and v != "":
            raise _bad(name, why, "unsupported_parameter")

    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise _bad("model", f"must be a string, got {_kind(model)}", "invalid_type")
        if limits.model_names and model not in limits.model_names:
            raise APIError(404, f"model: this server serves {', '.join(map(repr, limits.model_names))}, not "
                                f"{model!r} (GET /v1/models lists it)", param="model", code="model_not_found")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", f"must be a string, got {_kind(user)}", "invalid_type")

    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    best_of = _integer(body, "best_of", n, 1, MAX_CHOICES)
    if best_of != n:
        raise _bad("best_of", f"only best_of = n is supported (this server returns every choice), got best_of "
                              f"{best_of} with n {n}", "unsupported_parameter")
    max_tokens = _integer(body, "max_tokens", min(16, limits.max_tokens), 1, limits.max_tokens,
                          " (the server's --max-tokens cap)")
    sampling = {
        "temperature": _number(body, "temperature", 1.0, lambda v: 0 <= v <= 2, "between 0 and 2 (0 = greedy)"),
        "top_p": _number(body, "top_p", None, lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, lambda v: -2 <= v <= 2, "between -2 and 2"),
        "presence_penalty": _number(body, "presence_penalty", 0.0, lambda v: -2 <= v <= 2, "between -2 and 2"),
        "min_p": _number(body, "min_p", None, lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, lambda v: v > 0, "> 0 (1 = off)"),
    }
    top_k = _integer(body, "top_k", None, -1, None, " (0 or -1 = off)")
    sampling["top_k"] = top_k if top_k and top_k > 0 else None
    seed = _integer(body, "seed", None, 0, MAX_SEED)
    stream = _boolean(body, "stream")
    echo = _boolean(body, "echo")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise _bad("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict):
            raise _bad("stream_options", f"must be an object, got {_kind(options)}", "invalid_type")
        for key in options:
            if key != "include_usage":
                raise _bad(f"stream_options.{key}", "unknown field; stream_options takes include_usage",
                           "unknown_field")
        include_usage = _boolean(options, "include_usage")
    stop = _stops(body.get("stop"))
    prompts, texts = _prompts(body, limits, tokenizer, encode)
    if len(prompts) * n > MAX_CHOICES:
        raise _bad("n", f"{len(prompts)} prompts x n {n} = {len(prompts) * n} choices; at most {MAX_CHOICES} "
                        f"in one request")
    return CompletionRequest(prompts=prompts, prompt_texts=texts, n=n, max_tokens=max_tokens, sampling=sampling,
                             seed=seed, stop=stop, stream=stream, include_usage=include_usage, echo=echo)


def _stops(v) -> tuple[str, ...]:
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list):
        raise _bad("stop", f"must be a string or an array of strings, got {_kind(v)}", "invalid_type")
    if len(stops) > MAX_STOP:
        raise _bad("stop", f"at most {MAX_STOP} stop strings, got {len(stops)}")
    for s in stops:
        if not isinstance(s, str):
            raise _bad("stop", f"must be a string or an array of strings, got an array holding {_kind(s)}",
                       "invalid_type")
        if not s:
            raise _bad("stop", "an empty stop string would stop before any text; drop it")
        _check_encodable(s, "stop")
    return tuple(dict.fromkeys(stops))


def _prompts(body: dict, limits: Limits, tokenizer, encode) -> tuple[list[list[int]], list[str]]:
    """The prompts of a request as token ids and as text: a string, an array of strings, an array of token
    ids or an array of arrays of token ids."""
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt", "is required: the text to continue (a string)", "missing_field")
    p = body["prompt"]
    if isinstance(p, str) or (isinstance(p, list) and p and all(_is_id(x) for x in p)):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or isinstance(x, list) for x in p):
        items = p
    else:
        what = "an empty array" if p == [] else _kind(p) if not isinstance(p, list) else "an array of mixed types"
        raise _bad("prompt", f"must be a string, an array of strings, an array of token ids or an array of "
                             f"arrays of token ids, got {what}", "invalid_type")
    ids, texts = [], []
    for i, item in enumerate(items):
        which = "" if len(items) == 1 else f" {i + 1} of {len(items)}"
        if isinstance(item, str):
            _check_encodable(item, "prompt")
            unknown = tokenizer.unknown_chars(item)
            if unknown:
                shown = " ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
                raise _bad("prompt", f"the prompt{which} has characters the model's tokenizer cannot encode: "
                                     f"{shown}; remove or replace them", "unencodable_characters")
            tokens, text = encode(item), item
        else:
            if not item or not all(_is_id(x) for x in item):
                raise _bad("prompt", f"the token array{which} must be a non-empty array of integers",
                           "invalid_type")
            bad = [x for x in item if not 0 <= x < limits.vocab_size]
            if bad:
                raise _bad("prompt", f"token id {bad[0]} in the prompt{which} is outside the vocabulary "
                                     f"(0 to {limits.vocab_size - 1})")
            tokens, text = list(item), tokenizer.decode(item)
        if len(tokens) > limits.max_prompt_tokens:
            raise _bad("prompt", f"the prompt{which} is {len(tokens)} tokens; this server takes at most "
                                 f"{limits.max_prompt_tokens} (--max-prompt-tokens)", "context_length_exceeded")
        ids.append(tokens)
        texts.append(text)
    return ids, texts


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# -- answers ----------------------------------------------------------------------------------------------

def new_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice_object(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def completion_object(cid: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    out = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def models_object(names: list[str], created: int, owner: str = "tritongpt") -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": owner}
                                       for name in names]}


def to_json(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse(value) -> bytes:
    """One server-sent event carrying a JSON value."""
    return b"data: " + to_json(value) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
