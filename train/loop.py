"""The training loop: AMP, gradient accumulation, clipping, cosine LR, eval, logging, checkpoints."""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt import GPT, GPTConfig, ops
from gpt.runtime import autocast, dtype_name, peak_flops, resolve_device, resolve_dtype

from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import PreparedData, prepare_dataset
from .optim import MuonAdamW, muon_groups

# Model fields that may differ between a checkpoint and the run resuming it (they change how, not what).
RESUMABLE_DIFFERENCES = {"kernels", "gradient_checkpointing", "dropout"}


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


def lr_at(cfg: TrainConfig, it: int, progress: float) -> float:
    """Linear warmup over warmup_iters steps, times a cosine from lr to min_lr over progress in [0, 1].

    progress is it / max_iters, or the spent fraction of the time budget if that is further along,
    so a time-limited run still decays to min_lr by its end."""
    warm = min(1.0, (it + 1) / cfg.warmup_iters) if cfg.warmup_iters > 0 else 1.0
    p = min(max(progress, 0.0), 1.0)
    floor = cfg.min_lr / cfg.lr
    return cfg.lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """cfg.optimizer "adamw": AdamW, weight decay on matrices (>= 2-D) only, fused kernels on CUDA,
    foreach elsewhere. "muon": Muon for the blocks' matrices at cfg.matrix_lr, AdamW at cfg.lr for the
    rest (train/optim.py). Each group starts at its peak rate; the schedule scales that."""
    if cfg.optimizer == "muon":
        groups = muon_groups(model, cfg.matrix_lr, cfg.lr, cfg.weight_decay)
        return MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), momentum=cfg.momentum)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


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


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "ckpt.pt"
        torch.manual_seed(cfg.seed)

        resume_state = None
        if cfg.resume:
            if not self.ckpt_path.exists():
                raise CheckpointError(f"--resume: no checkpoint at {self.ckpt_path}; drop --resume to start fresh "
                                      f"or point --out-dir at the run to continue")
            resume_state = load_checkpoint(self.ckpt_path)

        self.data = open_data(cfg)
        self.tokenizer = self.data.tokenizer
        self.model_config = cfg.model_config(self.tokenizer.vocab_size)
        self.data.check_block_size(self.model_config.block_size)
        self.backend = ops.resolve(self.model_config.kernels, self.device)  # a clear error if impossible

        self.model = GPT(self.model_config).to(self.device)
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
        self.flops_per_token = self.model.flops_per_token(self.model_config.block_size)
        self._eval_seconds = 0.0  # duration of the last eval: the time budget keeps this much in reserve

    # -- checkpoints ------------------------------------------------------------------------------
    def _restore(self, ck: dict) -> None:
        saved = GPTConfig.from_dict(ck["model_config"])
        check_compatible(saved, self.model_config, self.ckpt_path)
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
        cfg, st = self.cfg, self.state
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_file = open(self.out / "metrics.jsonl", "a")
        T = self.model_config.block_size
        tokens_per_step = cfg.batch_size * cfg.grad_accum * T
        budget = cfg.time_budget * 60 if cfg.time_budget else None
        _log(f"model: {self.model.num_params():,} params | kernels {ops.describe(self.model_config.kernels, self.device)}"
             f" | {self.device} {dtype_name(self.dtype)} | {tokens_per_step:,} tokens/step"
             f" | MFU peak {self.peak / 1e12:.2f} TFLOP/s ({self.peak_source})")
        bar = _progress(cfg, st.iter)
        t_start = time.perf_counter() - st.elapsed   # budget clock, carried across resumes
        run_t0, run_first_iter = time.perf_counter(), st.iter  # this process's pace, for the ETA
        last_eval: dict = {}
        window_t, window_tokens, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
        self.model.train()
        stop_reason = "max_iters"
        saved_at_interrupt = False
        previous_handlers = self._install_signal_handlers()
        try:
            while st.iter < cfg.max_iters:
                if self._stop_signal is not None:
                    # Ctrl-C / SIGTERM arrived during the last step: stop at this boundary, exactly resumable.
                    st.elapsed = time.perf_counter() - t_start
                    self.save()
                    saved_at_interrupt = True
                    raise KeyboardInterrupt
                if stop_at is not None and st.iter >= stop_at:
                    st.elapsed = time.perf_counter() - t_start
                    self.save()
                    return {"iters": st.iter, "tokens": st.tokens, "elapsed": st.elapsed, "stop_reason": "stop_at"}
                elapsed = time.perf_counter() - t_start
                # Leave room for the final eval + checkpoint, which count against the budget too.
                if budget is not None and elapsed + self._eval_seconds >= budget:
                    stop_reason = "time budget"
                    break
                # The state at this boundary: what a checkpoint written mid-step (Ctrl-C) must hold.
                data_rng, torch_rng = self.data_gen.get_state(), rng_state()
                progress = st.iter / cfg.max_iters
                if budget is not None:
                    progress = max(progress, elapsed / max(budget - self._eval_seconds, 1e-9))
                lr = lr_at(cfg, st.iter, progress)
                for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
                    group["lr"] = peak * lr / cfg.lr
                try:
                    loss = self._step()
                except KeyboardInterrupt:
                    # Mid-step (a second Ctrl-C, or no handler in this thread): drop the partial step.
                    self.optimizer.zero_grad(set_to_none=True)
                    st.elapsed = time.perf_counter() - t_start
                    self.save(data_rng=data_rng, torch_rng=torch_rng)
                    saved_at_interrupt = True
                    raise
                st.iter += 1
                st.tokens += tokens_per_step
                window_tokens += tokens_per_step
                loss_sum, loss_n = loss_sum + loss, loss_n + 1
                if bar is not None:
                    bar.update(1)
                if st.iter % cfg.log_interval == 0 or st.iter == cfg.max_iters:
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    mean_loss = loss_sum / loss_n
                    if not math.isfinite(mean_loss):
                        raise TrainingError(
                            f"loss is {mean_loss} at iter {st.iter}; stopped. The last good checkpoint "
                            f"({self.ckpt_path}) is untouched. Lower --lr, raise --warmup-iters, or use --dtype bfloat16/float32")
                    mfu = self.flops_per_token * tps / self.peak
                    el = now - t_start
                    per_iter = (now - run_t0) / max(st.iter - run_first_iter, 1)
                    remaining = (cfg.max_iters - st.iter) * per_iter
                    if budget is not None:
                        remaining = min(remaining, max(budget - el, 0.0))
                    rec = {"iter": st.iter, "loss": mean_loss, "lr": lr, "tok_per_s": tps, "mfu": mfu,
                           "tokens": st.tokens, "elapsed": el}
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                    _write(bar, f"iter {st.iter:>6}/{cfg.max_iters} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                                f"{tps:,.0f} tok/s | MFU {100 * mfu:.1f}% | elapsed {_hms(el)} | ETA {_hms(remaining)}")
                    window_t, window_tokens, loss_sum, loss_n = now, 0, 0.0, 0
                if st.iter % cfg.eval_interval == 0 and st.iter < cfg.max_iters:
                    last_eval = self._eval_and_save(metrics_file, bar, t_start)
                    window_t = time.perf_counter()
            st.elapsed = time.perf_counter() - t_start
            last_eval = self._eval_and_save(metrics_file, bar, t_start)
            _write(bar, f"done ({stop_reason}): {st.iter} iters, {st.tokens:,} tokens in {_hms(st.elapsed)}; "
                        f"val loss {last_eval['val_loss']:.4f} (best {st.best_val:.4f}); checkpoint {self.ckpt_path}")
        except KeyboardInterrupt:
            if not saved_at_interrupt:  # between steps (logging, eval): the state is consistent as it is
                st.elapsed = time.perf_counter() - t_start
                self.save()
            print(f"\ninterrupted: checkpoint saved to {self.ckpt_path} at iter {st.iter}; "
                  f"continue with --resume", file=sys.stderr)
            raise
        finally:
            self._restore_signal_handlers(previous_handlers)
            if bar is not None:
                bar.close()
            metrics_file.close()
        return {"iters": st.iter, "tokens": st.tokens, "elapsed": st.elapsed, **last_eval,
                "best_val_loss": st.best_val, "stop_reason": stop_reason}

    def _install_signal_handlers(self) -> dict:
        """SIGINT/SIGTERM set a flag that the loop honours at the next step boundary; a second one
        interrupts at once. Only the main thread can own signal handlers."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop now)", file=sys.stderr)
        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    def _step(self) -> float:
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

    def _eval_and_save(self, metrics_file, bar, t_start: float) -> dict:
        st = self.state
        t0 = time.perf_counter()
        ev = self.evaluate()
        self._eval_seconds = time.perf_counter() - t0
        st.elapsed = time.perf_counter() - t_start
        if not (math.isfinite(ev["val_loss"]) and math.isfinite(ev["train_loss"])):
            raise TrainingError(f"eval loss is not finite at iter {st.iter}; stopped without saving. The last good "
                                f"checkpoint ({self.ckpt_path}) is untouched. Lower --lr or use --dtype bfloat16/float32")
        best = ev["val_loss"] < st.best_val
        if best:
            st.best_val = ev["val_loss"]
        self.save(best=best)
        rec = {"iter": st.iter, **ev, "tokens": st.tokens, "elapsed": st.elapsed}
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()
        _write(bar, f"eval @ {st.iter}: train {ev['train_loss']:.4f} | val {ev['val_loss']:.4f}"
                    f"{' (best)' if best else ''} | saved {self.ckpt_path}")
        plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png")
        return ev


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm
    # disable=None: the bar shows on a terminal only, so logs and CI output stay clean lines.
    return tqdm(total=cfg.max_iters, initial=start, unit="it", file=sys.stderr, disable=None, dynamic_ncols=True)


def _write(bar, msg: str) -> None:
    if bar is not None and not bar.disable:
        bar.write(msg, file=sys.stdout)
        sys.stdout.flush()
    else:
        _log(msg)


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """loss.png: train loss per log interval and the eval train/val losses, against iterations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = {}, {}
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            (evals if "val_loss" in rec else train)[rec["iter"]] = rec  # a resumed run overwrites its own iters
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
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
    plt.close(fig)
    tmp.replace(png_path)


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).train()

