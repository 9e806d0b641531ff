"""Continuous batching: a fixed set of slots kept busy with requests, each with its own sampling settings.

`Engine(model, tokenizer, slots)` owns the model and a KV cache of `slots` rows. `submit()` queues a
request (from any thread); each `step()` frees the slots of finished and cancelled requests, prefills
waiting requests into the free slots, and then gives every busy slot one token: a slot prefilled in this
step takes the token its prefill sampled, the others one decode forward over all slots (each at its own
length, gpt/generation/cache.py; the slots that do not decode are held: their placeholder tokens are
neither stored nor counted). So a finished row frees its slot at once and a long request never holds up
short ones. `start()` runs the steps in a daemon thread; `stop()` ends it, draining or cancelling.

Per row, as `generate` does for one prompt alone:
- its own sampling settings (`RequestParams`: temperature, top-k/p, min-p, penalties) through
  `choose_tokens_rows` (gpt/generation/sampling.py), which gives each row the token it would get alone,
  and its own `torch.Generator` (seeded by `seed`; a CPU generator, as `generate` uses), drawing only for
  its own row: a seeded request gives the same text whatever else is in the batch, and the same text as
  `generate(..., generator=torch.Generator().manual_seed(seed))` for its prompt alone;
- the prompt cropped to its last block_size tokens (the repetition penalty still counts all of it) and,
  past block_size, the last block_size // 2 tokens re-prefilled from position 0 (gpt/generation/eager.py);
- the end-of-text token and stop strings (`StopStrings`) end it ("stop"), max_tokens ("length").

Events. Each token gives the request an `Event`: the new text and token ids. The text is decoded
incrementally (only the tokens since the last complete character are decoded again) and never ends
inside a UTF-8 character or shows the beginning of a possible stop string; those characters come with a
later event. The last event has the finish reason and the rest of the text: all the events' texts
together are the completion's text, cut before a stop string (what `generate_completions` returns for it).

With compile=True (where compilation is available, gpt/generation/compiled.py) the cache is a
`DecodeState` of `slots` rows with a length per slot, the decode step over every slot is one compiled
static-shape function (`rows_step`: the slots that do not decode are held, their placeholder tokens
written to a scratch position), and each prefill one compiled call per request (`prefill_logits`, one
graph per prompt-length bucket). The step is specialized on a sampling plan (which steps run) that only
grows: every step any request so far needed, top-k's k rounded up to a power of two. A step a row does not
use leaves its token as it is, so the step compiles again only when a request switches on a step no
earlier one used (at most once per step, and per top-k size); new values (a temperature, a seed) never.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..ops import _warn_once
from ..runtime import autocast, resolve_compute_dtype
from .api import StopStrings, held_back
from .cache import DecodeState, KVCache
from .compiled import Compiled, compile_unavailable_reason, prefill_length, prefill_logits, rows_step, weights_key
from .sampling import (SamplingConfig, SamplingPlan, check_sampling_value, choose_tokens_rows, draw_exponential, record_tokens,
                       rows_params, rows_plan, token_counts)

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")
IDLE_WAIT_S = 0.05   # how long the engine thread sleeps when there is no work (a submit wakes it at once)


@dataclass(frozen=True)
class RequestParams:
    """How one request is generated. Sampling fields as in `SamplingConfig` (temperature 0 = greedy; None or
    the neutral value = off). max_tokens: at most this many new tokens (0: none). seed: the row's own
    generator (None: seeded from torch's global RNG). stop: strings that end the text (cut before the
    first). Invalid values raise ConfigError naming the field."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty"):
            check_sampling_value(name, getattr(self, name))
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2 ** 63):
            raise ConfigError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}") from None
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", stop)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                              self.frequency_penalty, self.presence_penalty)


@dataclass
class Event:
    """What one step produced for one request, delivered in order."""
    text: str                # newly decoded text (may be "" while a character or a possible stop string is unfinished)
    token_ids: list[int]     # the new token ids (the end-of-text token is not included)
    finish_reason: str | None = None   # None while going; then "stop", "length", "cancelled" or "error"


_ids = itertools.count()


class Request:
    """A submitted request: its counts and finish reason, `cancel()`, and its events (iterate it, or
    `events(timeout)`) unless they go to the on_event callback given to `Engine.submit`.

    prompt_tokens: the prompt's tokens as submitted (before any crop to block_size); completion_tokens:
    the tokens generated, the end-of-text token included; error: why, when finish_reason is "error"."""

    def __init__(self, prompt_ids: list[int], params: RequestParams, on_event: Callable[[Event], None] | None,
                 engine: "Engine"):
        self.id = f"req-{next(_ids)}"
        self.prompt_ids, self.params = prompt_ids, params
        self.prompt_tokens, self.completion_tokens = len(prompt_ids), 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._on_event = on_event
        self._events: queue.Queue | None = queue.Queue() if on_event is None else None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._engine = engine

    def __repr__(self) -> str:
        return (f"Request({self.id}, prompt_tokens={self.prompt_tokens}, completion_tokens={self.completion_tokens}, "
                f"finish_reason={self.finish_reason})")

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to end this request (thread-safe); its slot is freed at the next step, with a last
        event whose finish_reason is "cancelled". Nothing happens once it has finished."""
        self._cancel.set()
        self._engine._wake_up()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has finished (True) or timeout seconds passed (False)."""
        return self._done.wait(timeout)

    def events(self, timeout: float | None = None):
        """The events in order, blocking for each; ends after the one with a finish_reason. timeout: the
        longest wait for one event (TimeoutError after it; None: no limit)."""
        if self._events is None:
            raise ConfigError(f"request {self.id} delivers its events to its on_event callback; it has no iterator")
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no event within {timeout} s") from None
            yield event
            if event.finish_reason is not None:
                return

    def __iter__(self):
        return self.events()

    def _emit(self, event: Event) -> None:
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        try:
            if self._on_event is not None:
                self._on_event(event)
            else:
                self._events.put(event)
        finally:
            if event.finish_reason is not None:
                self._done.set()


class _Text:
    """The text of a growing list of token ids, decoded incrementally: each new token decodes only the
    tokens since the last complete character (with one token of context before them), and text is added
    only once it does not end in U+FFFD (a UTF-8 sequence cut between tokens)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.text = decode, [], ""
        self.prefix = self.read = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)


@dataclass
class _Row:
    """A busy slot: its request, context window, generator and text."""
    request: Request
    sampling: SamplingConfig
    window: list[int]                    # the tokens the model conditions on (the last is not in the cache yet)
    generator: torch.Generator
    text: _Text
    matcher: StopStrings | None
    fresh: bool = True                   # its cache does not hold its window: prefill it
    ids: list[int] = field(default_factory=list)   # generated tokens, without the end-of-text token
    sent: int = 0                        # characters of text already delivered


class Engine:
    """Continuous batching over `slots` rows (the module docstring). The engine puts the model in eval mode
    and is its only user while it runs.

    tokenizer: decodes the text (needs `decode(ids)`; its `eot_id`, if any, ends a request unless eot_id is
    given). dtype: the compute dtype (autocast), as for `generate`. compile: the compiled static-shape decode
    step (gpt/generation/compiled.py) where available, else eager (saying why, once).
    """

    def __init__(self, model, tokenizer, slots: int = 4, *, dtype: torch.dtype | str | None = None,
                 compile: bool = False, eot_id: int | None = None):
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ConfigError(f"slots must be an integer >= 1 (requests decoded together), got {slots!r}")
        self.model, self.tokenizer, self.slots = model.eval(), tokenizer, slots
        self.eot_id = eot_id if eot_id is not None else getattr(tokenizer, "eot_id", None)
        self.device = model.wte.weight.device
        self.compute_dtype = resolve_compute_dtype(dtype, self.device)
        c = model.config
        self.block, self.keep_len, self.vocab = c.block_size, max(c.block_size // 2, 1), c.vocab_size
        reason = compile_unavailable_reason(self.device) if compile else None
        if reason is not None:
            _warn_once(f"decoding without compilation: {reason}")
        self.calls: Compiled | None = None      # the compiled functions (compile=True where available)
        self.cache: KVCache | None = None       # the eager path's cache
        if compile and reason is None:
            self.calls = Compiled(self.device)
            # The dtype k and v come out in: autocast's, or the weights' where there is no autocast.
            self.kv_dtype = self.compute_dtype if self.compute_dtype != torch.float32 else model.wte.weight.dtype
            seen = torch.zeros(slots, self.vocab, dtype=torch.bool, device=self.device)
            self.state = DecodeState.take(model, slots, self.kv_dtype, seen, True)
            weakref.finalize(self, self.state.release)
            self.seen, self.counts = self.state.seen, self.state.counts
        else:
            self.cache = KVCache.for_model(model, slots)
            self.seen = torch.zeros(slots, self.vocab, dtype=torch.bool, device=self.device)
            self.counts = torch.zeros(slots, self.vocab, device=self.device)
        self._rows: list[_Row | None] = [None] * slots
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()        # guards _waiting and the stopping flags; wakes the thread
        self._step_lock = threading.Lock()        # one step at a time
        self._sampling = None                     # (plan, params) of the busy rows, rebuilt when they change
        self._step_plan = None                    # the compiled step's plan so far (`_grown`)
        self._thread: threading.Thread | None = None
        self._running = False
        self._closed = False                      # stop() was called: no more submissions

    # -- the queue -------------------------------------------------------------------------------
    def submit(self, prompt_ids, params: RequestParams | None = None,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """Queue a request (thread-safe). prompt_ids: its token ids (at least one). on_event(event), if
        given, is called from the engine's thread for every Event; else they go to the Request's iterator."""
        params = RequestParams() if params is None else params
        if not isinstance(params, RequestParams):
            raise ConfigError(f"params must be a RequestParams, got {type(params).__name__}")
        try:
            ids = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise ConfigError("prompt_ids must be a list of token ids (integers)") from None
        if not ids:
            raise ConfigError("prompt_ids needs at least one token (start an empty prompt with the end-of-text or "
                              "a newline token)")
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise ConfigError(f"prompt_ids must be token ids in [0, {self.vocab}), got {bad[0]}")
        request = Request(ids, params, on_event, self)
        with self._lock:
            if self._closed:
                raise ConfigError("the engine is stopped; submit before stop() or make a new Engine")
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def busy(self) -> int:
        """Slots holding a request."""
        return sum(r is not None for r in self._rows)

    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    def _wake_up(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # -- one step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """One scheduling step: free the slots of cancelled requests, prefill waiting requests into free
        slots, one token for every busy slot. Returns whether there was any work."""
        with self._step_lock:
            work = self._schedule()
            if not any(r is not None for r in self._rows):
                return work
            try:
                self._crop()
                if self.calls is not None:
                    tokens = self._next_compiled()
                else:
                    with autocast(self.device, self.compute_dtype):
                        logits = self._logits()
                    tokens = self._choose(logits)
            except Exception as e:       # the model failed: end the busy requests, keep serving
                log.exception("engine step failed")
                for slot, row in enumerate(self._rows):
                    if row is not None:
                        row.request.error = f"{type(e).__name__}: {e}"
                        self._finish(slot, "error")
                if self.cache is not None:
                    self.cache.reset()
                return True
            for slot, token in enumerate(tokens):
                if self._rows[slot] is not None:
                    self._deliver(slot, token)
            return True

    def _schedule(self) -> bool:
        work = False
        for slot, row in enumerate(self._rows):
            if row is not None and row.request.cancelled:
                self._finish(slot, "error" if row.request.error else "cancelled")
                work = True
        with self._lock:
            waiting = [r for r in self._waiting if not r.cancelled]
            dropped = [r for r in self._waiting if r.cancelled]
            self._waiting = deque(waiting)
            admitted = []
            for slot in range(self.slots):
                if self._rows[slot] is None and self._waiting:
                    admitted.append((slot, self._waiting.popleft()))
        for r in dropped:
            self._emit(r, Event("", [], "cancelled"))
            work = True
        for slot, request in admitted:
            self._admit(slot, request)
            work = True
        return work

    def _admit(self, slot: int, request: Request) -> None:
        p = request.params
        if p.max_tokens == 0:
            self._emit(request, Event("", [], "length"))
            return
        if p.seed is not None:
            generator = torch.Generator().manual_seed(p.seed)
        else:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ()).item()))
        matcher = StopStrings(p.stop, self.tokenizer.decode) if p.stop else None
        self._rows[slot] = _Row(request, p.sampling(), request.prompt_ids[-self.block:], generator,
                                _Text(self.tokenizer.decode), matcher)
        prompt = torch.tensor([request.prompt_ids], device=self.device)
        self.seen[slot] = token_counts(prompt, self.vocab)[0] > 0
        self.counts[slot] = 0
        self._sampling = None

    def _crop(self) -> None:
        for row in self._rows:
            if row is not None and len(row.window) > self.block:   # full: restart from the most recent tokens
                row.window = row.window[-self.keep_len:]
                row.fresh = True

    def _logits(self) -> torch.Tensor:
        """The next-token logits (slots, V) of every slot (free slots: anything), eagerly."""
        rows = self._rows
        prefill = [s for s, r in enumerate(rows) if r is not None and r.fresh]
        decode = [s for s, r in enumerate(rows) if r is not None and not r.fresh]
        model = self.model
        logits = None
        if decode:
            pending = torch.tensor([[r.window[-1] if r is not None else 0] for r in rows], device=self.device)
            self.cache.hold(s for s in range(self.slots) if s not in decode)
            logits = model.lm_head(model.hidden_states(pending, cache=self.cache)[:, -1, :]).float()
        if prefill:
            lens = [len(rows[s].window) for s in prefill]
            tokens = torch.zeros(len(prefill), max(lens), dtype=torch.long)
            for i, s in enumerate(prefill):
                tokens[i, :lens[i]] = torch.tensor(rows[s].window)
            h = model.hidden_states(tokens.to(self.device), cache=self.cache.prefill(prefill, lens))
            last = h[torch.arange(len(prefill), device=self.device), torch.tensor(lens, device=self.device) - 1]
            out = model.lm_head(last).float()
            if logits is None:
                logits = torch.zeros(self.slots, out.shape[1], device=self.device)
            logits = logits.index_copy(0, torch.tensor(prefill, device=self.device), out)
        return logits

    def _plan(self):
        """The sampling plan and params (slots, ROW_PARAMS) of the busy slots (free ones: greedy)."""
        if self._sampling is None:
            configs = [r.sampling if r is not None else SamplingConfig(temperature=0.0) for r in self._rows]
            plan = rows_plan(configs, self.vocab)
            if self.calls is not None:
                plan = self._grown(plan)
            self._sampling = (plan, rows_params(configs, self.vocab, self.device))
        return self._sampling

    def _grown(self, plan):
        """The plan the compiled step runs: every step any request so far needed (a step a row does not use
        leaves it as it is, so running more is exact), top-k's k rounded up to a power of two. It only grows,
        so the step compiles at most once per sampling step switched on and per top-k size, not again for
        every new mix of requests."""
        if plan.top_k:
            plan = dataclasses.replace(plan, top_k=min(1 << (plan.top_k - 1).bit_length(), self.vocab))
        old = self._step_plan
        if old is not None:
            plan = SamplingPlan(greedy=old.greedy and plan.greedy, top_k=max(old.top_k, plan.top_k),
                                top_p=old.top_p or plan.top_p, min_p=old.min_p or plan.min_p,
                                repetition=old.repetition or plan.repetition, counts=old.counts or plan.counts)
        self._step_plan = plan
        return plan

    def _noise(self, slots) -> torch.Tensor:
        """Exp(1) noise (slots, V): drawn with each sampling row's own generator in `slots`, ones elsewhere."""
        draws = [draw_exponential((1, self.vocab), r.generator, self.device)
                 if s in slots and r.sampling.temperature != 0 else None for s, r in enumerate(self._rows)]
        return torch.cat([d if d is not None else torch.ones(1, self.vocab, device=self.device) for d in draws])

    def _choose(self, logits: torch.Tensor) -> list[int]:
        plan, params = self._plan()
        busy = {s for s, r in enumerate(self._rows) if r is not None}
        noise = None if plan.greedy else self._noise(busy)
        nxt = choose_tokens_rows(logits, plan, params, self.seen, self.counts, noise)
        record_tokens(nxt, self.seen, self.counts)
        return nxt[:, 0].tolist()

    def _next_compiled(self) -> list[int]:
        """The next token of every slot (free slots: anything) from the compiled functions: one decode step
        over all slots for the busy ones that decode, one prefill per slot that needs one."""
        rows, model = self._rows, self.model
        prefill = [s for s, r in enumerate(rows) if r is not None and r.fresh]
        decode = [s for s, r in enumerate(rows) if r is not None and not r.fresh]
        weights = weights_key(model)
        tokens = [0] * self.slots
        if decode:
            plan, params = self._plan()
            active = torch.tensor([s in decode for s in range(self.slots)], device=self.device)
            pending = torch.tensor([[r.window[-1] if r is not None else 0] for r in rows], device=self.device)
            noise = None if plan.greedy else self._noise(set(decode))
            nxt = self.calls(rows_step, "step", self.slots, 1, (weights, plan, self.kv_dtype), model, self.state,
                             pending, active, plan, params, noise, weights, dtype=self.compute_dtype)[:, 0].tolist()
            for s in decode:
                tokens[s] = nxt[s]
        for s in prefill:
            row = rows[s]
            n = len(row.window)
            length = prefill_length(n, self.block)
            buf = torch.zeros(1, length, dtype=torch.long)
            buf[0, :n] = torch.tensor(row.window)
            index, last = torch.tensor([s], device=self.device), torch.tensor([n - 1], device=self.device)
            logits = self.calls(prefill_logits, "prefill", 1, length, (weights, self.kv_dtype), model, self.state,
                                buf.to(self.device), index, last, dtype=self.compute_dtype)
            config = [row.sampling]
            noise = None if row.sampling.temperature == 0 else draw_exponential((1, self.vocab), row.generator,
                                                                                self.device)
            seen, counts = self.seen[s:s + 1], self.counts[s:s + 1]
            nxt = choose_tokens_rows(logits.float(), rows_plan(config, self.vocab),
                                     rows_params(config, self.vocab, self.device), seen, counts, noise)
            record_tokens(nxt, seen, counts)
            tokens[s] = int(nxt[0, 0])
        return tokens

    def _deliver(self, slot: int, token: int) -> None:
        row = self._rows[slot]
        request = row.request
        request.completion_tokens += 1
        row.window.append(token)
        row.fresh = False
        if self.eot_id is not None and token == self.eot_id:
            self._finish(slot, "stop")
            return
        row.ids.append(token)
        row.text.push(token)
        hit = row.matcher.find(row.ids) if row.matcher is not None else None
        if hit is not None:
            cut, text = hit
            self._finish(slot, "stop", [token], text[:cut])
        elif len(row.ids) >= request.params.max_tokens:
            self._finish(slot, "length", [token])
        else:
            shown = len(row.text.text) - held_back(row.text.text, request.params.stop)
            delta = row.text.text[row.sent:shown] if shown > row.sent else ""
            row.sent += len(delta)
            self._emit(request, Event(delta, [token]))

    def _finish(self, slot: int, reason: str, token_ids: list[int] | None = None, text: str | None = None) -> None:
        """End the request in `slot` with its last event and free the slot. text: the whole completion text
        (None: the decoded ids; "" after a cancel or an error)."""
        row = self._rows[slot]
        self._rows[slot] = None
        self._sampling = None
        if reason in ("cancelled", "error"):
            text = row.text.text[:row.sent]
        elif text is None:
            text = self.tokenizer.decode(row.ids) if row.ids else ""
        rest = text[row.sent:] if text.startswith(row.text.text[:row.sent]) else ""
        self._emit(row.request, Event(rest, token_ids or [], reason))

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request._emit(event)
        except Exception as e:     # the caller's callback failed: end its request (next step), serve the others
            log.exception("on_event of %s failed", request.id)
            if event.finish_reason is None:
                request.error = f"its on_event callback raised {type(e).__name__}: {e}"
                request._cancel.set()

    # -- the background thread -------------------------------------------------------------------
    def start(self) -> None:
        """Run step() in a daemon thread until stop()."""
        with self._lock:
            if self._closed:
                raise ConfigError("the engine is stopped; make a new Engine")
            if self._thread is not None:
                return
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="gpt-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._running:
                    return
            if not self.step():
                with self._lock:
                    if self._running and not self._waiting:
                        self._lock.wait(IDLE_WAIT_S)

    def stop(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the engine; no request can be submitted after. drain: finish the requests in flight and
        waiting first (for at most timeout seconds, then the rest is cancelled); else cancel them all
        (finish_reason "cancelled")."""
        with self._lock:
            self._closed = True
            thread = self._thread
        deadline = None if timeout is None else time.monotonic() + timeout
        if drain:
            while (self.busy() or self.waiting()) and (deadline is None or time.monotonic() < deadline):
                if thread is not None:
                    time.sleep(0.005)
                else:
                    self.step()
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if thread is not None:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
            self._thread = None
        with self._lock:
            for request in self._waiting:
                request._cancel.set()
        for row in self._rows:
            if row is not None:
                row.request._cancel.set()
        with self._step_lock:
            self._schedule()


__all__ = ["Engine", "Event", "Request", "RequestParams", "FINISH_REASONS"]
