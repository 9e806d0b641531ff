"""The training loop: AMP, gradient accumulation, clipping, cosine LR, eval, logging, checkpoints.

`Trainer(cfg).train()` runs one job. Its pieces, in the order a step meets them: `_Clock` (wall clock
carried across resumes, the time budget, the schedule's progress), `_set_lr`, `_step` (one optimizer
step over grad_accum micro-batches), `_Meter` and `_log_progress` (the log line and metrics.jsonl),
`_eval_and_save`; `_stop_on_signals` turns Ctrl-C/SIGTERM into a stop at the next step boundary.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from gpt import GPT, GPTConfig, ops
from gpt.checkpoint import model_config_of, read_checkpoint
from gpt.errors import CheckpointError
from gpt.runtime import autocast, dtype_name, peak_flops, resolve_device, resolve_dtype
from gpt.optional import import_optional

from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import PreparedData, prepare_dataset
from .errors import TrainingError
from .optim import make_optimizer

# Model fields that may differ between a checkpoint and the run resuming it (they change how, not what).
RESUMABLE_DIFFERENCES = {"dropout"}


def lr_at(cfg: TrainConfig, it: int, progress: float) -> float:
    """Linear warmup over warmup_iters steps, times a cosine from lr to min_lr over progress in [0, 1].

    progress is it / max_iters, or the spent fraction of the time budget if that is further along,
    so a time-limited run still decays to min_lr by its end."""
    warm = min(1.0, (it + 1) / cfg.warmup_iters) if cfg.warmup_iters > 0 else 1.0
    p = min(max(progress, 0.0), 1.0)
    floor = cfg.min_lr / cfg.lr
    return cfg.lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def open_data(cfg: TrainConfig) -> PreparedData:
    """The run's dataset, tokenized and cached under cfg.data_dir (built on first use)."""
    return prepare_dataset(None if cfg.hf_dataset else cfg.dataset, cfg.tokenizer, cfg.data_dir,
                           vocab_size=cfg.vocab_size, hf_dataset=cfg.hf_dataset, hf_config=cfg.hf_config,
                           hf_split=cfg.hf_split, text_field=cfg.text_field)


@dataclass
class RunState:
    iter: int = 0                  # next optimizer step to take
    best_val: float = float("inf")
    elapsed: float = 0.0           # seconds of training wall clock before this process
    tokens: int = 0                # tokens trained on


def _log(msg: str) -> None:
    print(msg, flush=True)


def check_compatible(saved: GPTConfig, wanted: GPTConfig, path: Path) -> None:
    diffs = [f"{k}={getattr(saved, k)!r} (this run: {getattr(wanted, k)!r})"
             for k in saved.to_dict() if k not in RESUMABLE_DIFFERENCES and getattr(saved, k) != getattr(wanted, k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with a different model: {'; '.join(diffs)}. "
                              f"Use the same --preset/model flags to resume, or a new --out-dir to start fresh")


class _Clock:
    """The run's wall clock, carried across resumes: elapsed time, the time budget (which keeps the last
    eval's duration in reserve for the final eval and checkpoint) and the LR schedule's progress."""

    def __init__(self, cfg: TrainConfig, elapsed_before: float):
        self.start = time.perf_counter() - elapsed_before
        self.budget = cfg.time_budget * 60 if cfg.time_budget else None
        self.max_iters = cfg.max_iters
        self.reserve = 0.0  # duration of the last eval

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.budget is not None and self.elapsed() + self.reserve >= self.budget

    def progress(self, it: int) -> float:
        p = it / self.max_iters
        if self.budget is not None:
            p = max(p, self.elapsed() / max(self.budget - self.reserve, 1e-9))
        return p

    def remaining(self, it: int, seconds_per_iter: float) -> float:
        left = (self.max_iters - it) * seconds_per_iter
        return min(left, max(self.budget - self.elapsed(), 0.0)) if self.budget is not None else left


class _Meter:
    """Tokens and losses since the last log line, and this process's pace (for the ETA)."""

    def __init__(self, first_iter: int):
        self.t0, self.first_iter = time.perf_counter(), first_iter
        self.restart()

    def restart(self) -> None:
        self.window_t, self.tokens, self.loss_sum, self.steps = time.perf_counter(), 0, 0.0, 0

    def add(self, loss: float, tokens: int) -> None:
        self.loss_sum, self.steps, self.tokens = self.loss_sum + loss, self.steps + 1, self.tokens + tokens

    def seconds_per_iter(self, it: int) -> float:
        return (time.perf_counter() - self.t0) / max(it - self.first_iter, 1)


class _SavedInterrupt(KeyboardInterrupt):
    """An interrupt whose checkpoint has been written already."""


class Trainer:
    def __init__(self, cfg: TrainConfig, trust_checkpoint: bool = False):
        """trust_checkpoint: resume from a checkpoint that needs pickle (an older format; runs code)."""
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        ops.resolve(cfg.kernels, self.device)  # 'triton' where it cannot run: a clear error before any data work
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "ckpt.pt"
        torch.manual_seed(cfg.seed)

        resume_state = None
        if cfg.resume:
            if not self.ckpt_path.exists():
                raise CheckpointError(f"--resume: no checkpoint at {self.ckpt_path}; drop --resume to start fresh "
                                      f"or point --out-dir at the run to continue")
            resume_state = read_checkpoint(self.ckpt_path, trust=trust_checkpoint)

        self.data = open_data(cfg)
        self.tokenizer = self.data.tokenizer
        self.model_config = cfg.model_config(self.tokenizer.vocab_size)
        self.data.check_block_size(self.model_config.block_size)

        self.model = GPT(self.model_config, kernels=cfg.kernels,
                         gradient_checkpointing=cfg.gradient_checkpointing).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        # Peak rate per group, from this run's config (a resumed run may change --lr).
        self.peak_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.state = RunState()
        if resume_state is not None:
            self._restore(resume_state)
        self.step_model = torch.compile(self.model) if cfg.compile else self.model
        self.peak, self.peak_source = peak_flops(self.device, self.dtype)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model_config.block_size
        self.flops_per_token = self.model.flops_per_token(self.model_config.block_size)
        self._stop_signal = None

    # -- checkpoints ------------------------------------------------------------------------------
    def _restore(self, ck: dict) -> None:
        check_compatible(model_config_of(ck, self.ckpt_path), self.model_config, self.ckpt_path)
        if ck["tokenizer"] != self.tokenizer.to_dict():
            raise CheckpointError(f"checkpoint {self.ckpt_path} used a different tokenizer or vocabulary than "
                                  f"this dataset; resume with the same --dataset/--tokenizer, or use a new --out-dir")
        saved_opt = ck.get("train_config", {}).get("optimizer", "adamw")
        if saved_opt != self.cfg.optimizer:
            raise CheckpointError(f"checkpoint {self.ckpt_path} was trained with --optimizer {saved_opt}; resume with "
                                  f"--optimizer {saved_opt}, or use a new --out-dir to start fresh")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        self.data_gen.set_state(ck["data_rng"])
        self.state = RunState(**ck["run_state"])
        _log(f"resumed from {self.ckpt_path} at iter {self.state.iter}")

    def checkpoint_state(self, data_rng: torch.Tensor | None = None, torch_rng: dict | None = None) -> dict:
        return {
            "model": self.model.state_dict(),
            "model_config": self.model_config.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "train_config": self.cfg.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iter": self.state.iter,
            "run_state": vars(self.state).copy(),
            "rng": torch_rng if torch_rng is not None else rng_state(),
            "data_rng": data_rng if data_rng is not None else self.data_gen.get_state(),
        }

    def save(self, best: bool = False, **kw) -> None:
        state = self.checkpoint_state(**kw)
        save_checkpoint(state, self.ckpt_path)
        if best:
            save_checkpoint(state, self.out / "ckpt_best.pt")

    def _save_now(self, clock: _Clock, **kw) -> None:
        self.state.elapsed = clock.elapsed()
        self.save(**kw)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss on eval_iters batches of each split; the same batches at every eval (own generator)."""
        self.model.eval()
        out = {}
        T = self.model_config.block_size
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(self.cfg.seed + 1)
            losses = []
            for _ in range(self.cfg.eval_iters):
                x, y = self.data.get_batch(split, self.cfg.batch_size, T, self.device, gen)
                with autocast(self.device, self.dtype):
                    _, loss = self.step_model(x, y)
                losses.append(loss.item())
            out[f"{split}_loss"] = sum(losses) / len(losses)
        self.model.train()
        return out

    # -- the loop -----------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> dict:
        """Run to max_iters (or the time budget). stop_at: pause after that iteration with a checkpoint
        and no final eval, as if interrupted there; a later run with resume=True continues exactly."""
        self.out.mkdir(parents=True, exist_ok=True)
        st = self.state
        _log(f"model: {self.model.num_params():,} params | kernels {self.cfg.kernels} -> "
             f"{self.model.kernels_in_use()} ({self.device.type}) | {self.device} {dtype_name(self.dtype)} | "
             f"{self.tokens_per_step:,} tokens/step | MFU peak {self.peak / 1e12:.2f} TFLOP/s ({self.peak_source})")
        clock = _Clock(self.cfg, st.elapsed)
        with contextlib.ExitStack() as stack:
            self._metrics = stack.enter_context(open(self.out / "metrics.jsonl", "a"))
            self._bar = stack.enter_context(_progress(self.cfg, st.iter))
            stack.enter_context(self._stop_on_signals())
            try:
                stop_reason = self._run_steps(clock, stop_at)
                if stop_reason == "stop_at":
                    self._save_now(clock)
                    return {"iters": st.iter, "tokens": st.tokens, "elapsed": st.elapsed, "stop_reason": stop_reason}
                st.elapsed = clock.elapsed()
                last_eval = self._eval_and_save(clock)
            except KeyboardInterrupt as e:
                if not isinstance(e, _SavedInterrupt):  # between steps (logging, eval): the state is consistent
                    self._save_now(clock)
                print(f"\ninterrupted: checkpoint saved to {self.ckpt_path} at iter {st.iter}; "
                      f"continue with --resume", file=sys.stderr)
                raise
            self._write(f"done ({stop_reason}): {st.iter} iters, {st.tokens:,} tokens in {_hms(st.elapsed)}; "
                        f"val loss {last_eval['val_loss']:.4f} (best {st.best_val:.4f}); checkpoint {self.ckpt_path}")
        return {"iters": st.iter, "tokens": st.tokens, "elapsed": st.elapsed, **last_eval,
                "best_val_loss": st.best_val, "stop_reason": stop_reason}

    def _run_steps(self, clock: _Clock, stop_at: int | None) -> str:
        """Optimizer steps until one of the stop reasons ("max_iters", "time budget", "stop_at")."""
        cfg, st = self.cfg, self.state
        self.model.train()
        meter = _Meter(st.iter)
        while st.iter < cfg.max_iters:
            if self._stop_signal is not None:  # Ctrl-C / SIGTERM during the last step: stop at this boundary
                self._save_now(clock)
                raise _SavedInterrupt
            if stop_at is not None and st.iter >= stop_at:
                return "stop_at"
            if clock.out_of_time():
                return "time budget"
            lr = self._set_lr(clock)
            loss = self._step_or_save_boundary(clock)
            st.iter += 1
            st.tokens += self.tokens_per_step
            meter.add(loss, self.tokens_per_step)
            if self._bar is not None:
                self._bar.update(1)
            if st.iter % cfg.log_interval == 0 or st.iter == cfg.max_iters:
                self._log_progress(meter, lr, clock)
            if st.iter % cfg.eval_interval == 0 and st.iter < cfg.max_iters:
                t0 = time.perf_counter()
                self._eval_and_save(clock)
                meter.window_t += time.perf_counter() - t0  # tokens/s counts training time only
        return "max_iters"

    def _set_lr(self, clock: _Clock) -> float:
        """The schedule's rate for this step, applied to every group in proportion to its peak rate."""
        lr = lr_at(self.cfg, self.state.iter, clock.progress(self.state.iter))
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * lr / self.cfg.lr
        return lr

    def _step_or_save_boundary(self, clock: _Clock) -> float:
        """One step; interrupted mid-step, it drops the partial step and saves the state from before it."""
        data_rng, torch_rng = self.data_gen.get_state(), rng_state()
        try:
            return self._step()
        except KeyboardInterrupt:  # a second Ctrl-C, or no signal handler in this thread
            self.optimizer.zero_grad(set_to_none=True)
            self._save_now(clock, data_rng=data_rng, torch_rng=torch_rng)
            raise _SavedInterrupt from None

    def _step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns their mean loss."""
        cfg = self.cfg
        T = self.model_config.block_size
        total = 0.0
        for _ in range(cfg.grad_accum):
            x, y = self.data.get_batch("train", cfg.batch_size, T, self.device, self.data_gen)
            with autocast(self.device, self.dtype):
                _, loss = self.step_model(x, y)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.item()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total / cfg.grad_accum

    # -- logging ------------------------------------------------------------------------------
    def _log_progress(self, meter: _Meter, lr: float, clock: _Clock) -> None:
        """The log line and a metrics.jsonl record: mean loss, tokens/s and MFU since the last one, ETA."""
        st = self.state
        mean_loss = meter.loss_sum / meter.steps
        if not math.isfinite(mean_loss):
            raise TrainingError(
                f"loss is {mean_loss} at iter {st.iter}; stopped. The last good checkpoint ({self.ckpt_path}) is "
                f"untouched. Lower --lr, raise --warmup-iters, or use --dtype bfloat16/float32")
        tps = meter.tokens / max(time.perf_counter() - meter.window_t, 1e-9)
        mfu = self.flops_per_token * tps / self.peak
        elapsed = clock.elapsed()
        remaining = clock.remaining(st.iter, meter.seconds_per_iter(st.iter))
        self._record({"iter": st.iter, "loss": mean_loss, "lr": lr, "tok_per_s": tps, "mfu": mfu,
                      "tokens": st.tokens, "elapsed": elapsed})
        self._write(f"iter {st.iter:>6}/{self.cfg.max_iters} | loss {mean_loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                    f"MFU {100 * mfu:.1f}% | elapsed {_hms(elapsed)} | ETA {_hms(remaining)}")
        meter.restart()

    def _record(self, rec: dict) -> None:
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()

    def _write(self, msg: str) -> None:
        """A log line on stdout, printed above the progress bar when there is one."""
        if self._bar is not None and not self._bar.disable:
            self._bar.write(msg, file=sys.stdout)
            sys.stdout.flush()
        else:
            _log(msg)

    def _eval_and_save(self, clock: _Clock) -> dict:
        st = self.state
        t0 = time.perf_counter()
        ev = self.evaluate()
        clock.reserve = time.perf_counter() - t0
        st.elapsed = clock.elapsed()
        if not (math.isfinite(ev["val_loss"]) and math.isfinite(ev["train_loss"])):
            raise TrainingError(f"eval loss is not finite at iter {st.iter}; stopped without saving. The last good "
                                f"checkpoint ({self.ckpt_path}) is untouched. Lower --lr or use --dtype bfloat16/float32")
        best = ev["val_loss"] < st.best_val
        if best:
            st.best_val = ev["val_loss"]
        self.save(best=best)
        self._record({"iter": st.iter, **ev, "tokens": st.tokens, "elapsed": st.elapsed})
        self._write(f"eval @ {st.iter}: train {ev['train_loss']:.4f} | val {ev['val_loss']:.4f}"
                    f"{' (best)' if best else ''} | saved {self.ckpt_path}")
        plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png")
        return ev

    # -- signals ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM set a flag that the loop honours at the next step boundary; a second one
        interrupts at once. Only the main thread can own signal handlers."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop now)", file=sys.stderr)
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)


def progress_bar(**kwargs):
    """A tqdm bar on stderr, shown on a terminal only (logs and CI output stay clean lines), or None
    when tqdm is not installed: the bar is a nicety, the log lines say the same."""
    tqdm = import_optional("tqdm", "the progress bar", error=None)
    return None if tqdm is None else tqdm.tqdm(file=sys.stderr, disable=None, **kwargs)


def _progress(cfg: TrainConfig, start: int):
    """The run's progress bar, or a null context when cfg.progress is off or tqdm is missing."""
    bar = progress_bar(total=cfg.max_iters, initial=start, unit="it", dynamic_ncols=True) if cfg.progress else None
    return contextlib.nullcontext() if bar is None else bar


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """loss.png: train loss per log interval and the eval train/val losses, against iterations."""
    train, evals = {}, {}
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            (evals if "val_loss" in rec else train)[rec["iter"]] = rec  # a resumed run overwrites its own iters
    fig = Figure(figsize=(7, 4.2), dpi=110)  # no pyplot: no global backend or figure state
    ax = fig.subplots()
    if train:
        its = sorted(train)
        ax.plot(its, [train[i]["loss"] for i in its], lw=0.8, alpha=0.6, label="train (per log interval)")
    if evals:
        its = sorted(evals)
        ax.plot(its, [evals[i]["train_loss"] for i in its], "o-", ms=3, label="train (eval)")
        ax.plot(its, [evals[i]["val_loss"] for i in its], "o-", ms=3, label="val (eval)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(png_path)
