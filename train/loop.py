"""The training loop: AMP, gradient accumulation, clipping, the LR schedule, eval, logging, checkpoints.

`Trainer(cfg).train()` runs one job. Its pieces, in the order a step meets them: `_Clock` (wall clock
carried across resumes, the time budget, the schedule's progress), `_set_lr`, `_step` (one optimizer
step over grad_accum micro-batches), `_Meter` and `_log_progress` (the log line and metrics.jsonl),
`_eval_and_save`; `_stop_on_signals` turns Ctrl-C/SIGTERM into a stop at the next step boundary.
Batches come from `train_loader` (train/data/loader.py: windows or documents, --batching; prefetched
in a background thread on CUDA), whose state every checkpoint holds, so a resumed run trains on the
very batches an uninterrupted one would have; evals have a loader per split, rewound at every eval.

Under torchrun (train/distributed.py) the same loop runs on every rank: `batch_size` is per rank, so
one optimizer step takes batch_size x grad_accum x world sequences; gradients are reduced on the last
micro-step only; the logged losses are means over all ranks. Every decision to stop (signal, time
budget, non-finite loss) is taken by all ranks together, at a step boundary. Rank 0 alone prints and
writes files, except FSDP's sharded checkpoints, which every rank writes its part of.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt import GPT, GPTConfig, ops
from gpt.checkpoint import SHARDED_DIR, model_config_of, read_checkpoint
from gpt.errors import CheckpointError, ConfigError
from gpt.files import atomic_open
from gpt.hf import read_hf
from gpt.runtime import autocast, dtype_name, peak_flops, resolve_dtype
from gpt.optional import import_optional
from gpt.tokenizer import Tokenizer

from .checkpoint import (load_full_state, load_sharded, read_meta, rng_state, save_checkpoint, save_sharded,
                         saved_iter, set_rng_state, sharded_checkpoint)
from .config import TrainConfig
from .consolidate import consolidate
from .data import PreparedData, prepare_dataset
from .data.loader import BatchLoader, make_loader, resolve_batching
from .data.shards import Shard, TokenSplit
from .distributed import clip_grad_norm, grad_sync, init_distributed, parallelize
from .errors import TrainingError
from .loggers import open_loggers, require as require_loggers
from .optim import make_optimizer

# Model fields that may differ between a checkpoint and the run resuming it (they change how, not what).
RESUMABLE_DIFFERENCES = {"dropout"}


def warmup_steps(cfg: TrainConfig) -> int:
    """The warmup's length: warmup_iters, but at most half of max_iters, so that a short run still
    reaches its peak rate and has the other half to decay (--max-iters 30 with 100 warmup steps warms
    up over 15)."""
    return min(cfg.warmup_iters, cfg.max_iters // 2)


def lr_at(cfg: TrainConfig, it: int, progress: float) -> float:
    """The learning rate of step `it` (0-based) at `progress` through the run, in [0, 1].

    Warmup: a linear ramp over the first W = warmup_steps(cfg) steps, reaching cfg.lr on step W - 1.
    Then the decay, from cfg.lr to cfg.min_lr (cosine or linear: cfg.schedule), over the last
    decay_frac of the run, or over all of it after the warmup if that is shorter; before the decay
    starts the rate stays at cfg.lr (decay_frac < 1: warmup-stable-decay). After the warmup the rate
    never goes below min_lr, and it reaches min_lr when progress reaches 1.

    progress is it / max_iters, or the spent fraction of the time budget if that is further along,
    so a time-limited run still decays to min_lr by its end."""
    w = warmup_steps(cfg)
    if it < w:
        return cfg.lr * (it + 1) / w
    start = max(w / cfg.max_iters, 1 - cfg.decay_frac)  # where the decay begins, as progress
    q = min(max((progress - start) / (1 - start), 0.0), 1.0)  # through the decay; start <= 0.5 < 1
    shape = 1 - q if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * q))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def open_data(cfg: TrainConfig, tokenizer: Tokenizer | None = None) -> PreparedData:
    """The run's dataset, tokenized and cached under cfg.data_dir (built on first use); with the given
    tokenizer (a model imported with --init-from brings its own) instead of cfg.tokenizer."""
    from .data.tokens import prepare_from_config  # the call python -m train.prepare makes: the same data

    return prepare_from_config(cfg, tokenizer)


def token_split(data: PreparedData, name: str) -> TokenSplit:
    """One split of `data` as a TokenSplit: the one place the loop reads a PreparedData's splits. Data
    whose split is a plain token array (as prepared before shards) becomes one shard with no document
    starts and no byte count: windows batching only, and no bits per byte."""
    split = data.split(name)
    if isinstance(split, TokenSplit):
        return split
    path = Path(getattr(data, "dir", ".")) / f"{name}.bin"
    return TokenSplit(name, [Shard(path, split, np.zeros(0, np.int64))])


# Model fields a run may still set with --init-from: the architecture comes from the folder.
INIT_FROM_OVERRIDES = {"dropout", "block_size"}


def read_init_from(cfg: TrainConfig) -> tuple[GPTConfig, dict, Tokenizer]:
    """--init-from: the folder's model config (with the allowed overrides), weights and tokenizer."""
    config, state_dict, tokenizer = read_hf(cfg.init_from, cfg.model.get("block_size"))
    differ = [f"{k}={v!r} (the folder's: {getattr(config, k)!r})" for k, v in sorted(cfg.model.items())
              if k not in INIT_FROM_OVERRIDES and getattr(config, k) != v]
    if differ:
        raise ConfigError(f"--init-from {cfg.init_from}: the architecture comes from the folder, so "
                          f"{'; '.join(differ)} cannot be set; drop those (only {', '.join(sorted(INIT_FROM_OVERRIDES))} "
                          f"may change)")
    if "dropout" in cfg.model:
        config = dataclasses.replace(config, dropout=cfg.model["dropout"])
    return config, state_dict, tokenizer


@dataclass
class RunState:
    iter: int = 0                  # next optimizer step to take
    best_val: float = float("inf")
    elapsed: float = 0.0           # seconds of training wall clock before this process
    tokens: int = 0                # tokens trained on
    finished: str | None = None    # why the run ended ("max_iters", "time budget"); None while it can go on


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

    def iters_end_first(self, it: int, seconds_per_iter: float) -> bool:
        """Whether max_iters, at this pace, ends the run before the time budget does (always, with none)."""
        return self.budget is None or (self.max_iters - it) * seconds_per_iter <= self.budget - self.elapsed()


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
        """trust_checkpoint: resume from a checkpoint that needs pickle (an older format; runs code).
        Under torchrun this starts the process group (if none exists); `close()` ends it."""
        cfg.validate()
        self.cfg = cfg
        self.world, self.device = init_distributed(cfg.parallel, cfg.device)
        try:
            self._setup(trust_checkpoint)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the prefetch thread; end the process group if this Trainer started it (nothing for one process)."""
        if getattr(self, "train_loader", None) is not None:
            self.train_loader.close()
        self.world.close()

    def _setup(self, trust_checkpoint: bool) -> None:
        cfg, world = self.cfg, self.world
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if world.parallel == "fsdp" and self.dtype == torch.float16:
            raise ConfigError("--parallel fsdp with --dtype float16: loss scaling does not cover sharded "
                              "gradients here; use --dtype bfloat16 (or --parallel ddp)")
        ops.resolve(cfg.kernels, self.device)  # 'triton' where it cannot run: a clear error before any data work
        if world.main:
            require_loggers(cfg)  # --log tensorboard/wandb without the package: a clear error before any data work
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "ckpt.pt"
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank

        resume_state, self._resume_dir = (self._read_resume_state(trust_checkpoint) if cfg.resume else (None, None))

        # Rank 0 tokenizes and caches the dataset first, then the first rank of every other node (in
        # case its data_dir is not shared), then the rest read the cache: never two builders of one file.
        init = read_init_from(cfg) if cfg.init_from else None
        my_turn = 0 if world.main else 1 if world.local_rank == 0 else 2
        for turn in range(3 if world.size > 1 else 1):
            if turn == my_turn:
                with contextlib.redirect_stderr(io.StringIO()) if not world.main else contextlib.nullcontext():
                    self.data = open_data(cfg, init[2] if init else None)
            world.barrier()
        self.tokenizer = self.data.tokenizer
        self.model_config = init[0] if init else cfg.model_config(self.tokenizer.vocab_size)
        self.data.check_block_size(self.model_config.block_size)

        self.model = GPT(self.model_config, kernels=cfg.kernels, gradient_checkpointing=cfg.gradient_checkpointing,
                         fused_loss=cfg.fused_loss)
        if init and resume_state is None:  # a resumed run takes its weights from the checkpoint
            self.model.load_state_dict(init[1])
            self._log(f"initialized from {cfg.init_from}: {self.model.num_params():,} params, "
                      f"{self.tokenizer.kind} tokenizer ({self.tokenizer.vocab_size} tokens) from the folder")
        del init
        self.model.to(self.device)
        self.step_model = parallelize(self.model, world, self.device, self.dtype, cfg.compile)
        if world.size > 1:
            torch.manual_seed(cfg.seed + world.rank)  # dropout: a different stream on every rank
        self.optimizer = make_optimizer(self.model, cfg, self.device, distributed=world.distributed,
                                        sharded=world.parallel == "fsdp")
        # Peak rate per group, from this run's config (a resumed run may change --lr).
        self.peak_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        # Batches: the train loader (state in every checkpoint; a prefetch thread on CUDA) and one loader per
        # split for evals, rewound to its start at every eval so that every eval sees the same batches.
        # auto: documents for data split by whole documents, else windows; a resumed run keeps its checkpoint's.
        split_method = getattr(self.data, "split_method", "position")
        saved_mode = (resume_state.get("data_state") or {"mode": "windows"})["mode"] if resume_state else None
        if cfg.batching == "auto" and saved_mode is not None:
            self.batching, self._batching_why = saved_mode, " (auto: the checkpoint's)"
        else:
            self.batching = resolve_batching(cfg.batching, split_method)
            self._batching_why = f" (auto: split by {split_method})" if cfg.batching == "auto" else ""
        self.splits = {name: token_split(self.data, name) for name in ("train", "val")}
        self.train_loader = self._loader("train", cfg.seed)
        self._eval_loaders = {name: self._loader(name, cfg.seed + 1, prefetch=False) for name in self.splits}
        self._eval_starts = {name: loader.state_dict() for name, loader in self._eval_loaders.items()}
        self.state = RunState()
        self.resumed_from: Path | None = None  # the checkpoint (file or sharded directory) this run continues
        if resume_state is not None:
            self._restore(resume_state)
        self.peak, self.peak_source = peak_flops(self.device, self.dtype)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model_config.block_size * world.size
        self.flops_per_token = self.model.flops_per_token(self.model_config.block_size)
        self._stop_signal = None
        self._last_eval: tuple[int, dict] | None = None  # (iter, losses) of this process's latest eval

    def _complete_reason(self) -> str | None:
        """Why a resumed run has nothing left to do under this config, or None: it has taken max_iters
        steps, or its time budget ended it and this run's budget is no larger, or the budget is spent."""
        cfg, st = self.cfg, self.state
        if self.resumed_from is None:
            return None
        if st.iter >= cfg.max_iters:
            return f"iter {st.iter} of max_iters {cfg.max_iters}"
        if cfg.time_budget is not None:
            budget = cfg.time_budget * 60
            if st.elapsed >= budget or (st.finished == "time budget" and budget <= self._saved_budget):
                return f"its time budget ({_hms(budget)}) is spent: iter {st.iter}, {_hms(st.elapsed)} in"
        return None

    # -- checkpoints ------------------------------------------------------------------------------
    def _read_resume_state(self, trust: bool) -> tuple[dict, Path | None]:
        """The checkpoint to resume (its meta.pt for a sharded one) and, if sharded, its directory.

        A run directory may hold both formats: OUT/ckpt.pt (one process and DDP write it, FSDP's
        consolidation too) and OUT/ckpt_sharded (FSDP). The one at the higher iteration is resumed,
        whatever this run's --parallel: a sharded checkpoint loads into an unsharded model, and a
        single file into a sharded one, so no run ever goes back to older state. At equal iterations
        (a consolidated run) each mode takes its own format."""
        sharded = sharded_checkpoint(self.out)
        if sharded is None and not self.ckpt_path.exists():
            raise CheckpointError(f"--resume: no checkpoint in {self.out} (neither {self.ckpt_path.name} nor "
                                  f"{SHARDED_DIR}/); drop --resume to start fresh or point --out-dir at the run")
        meta = read_meta(sharded) if sharded is not None else None
        single_iter = saved_iter(self.ckpt_path, trust) if self.ckpt_path.exists() else None
        fsdp = self.world.parallel == "fsdp"
        use_sharded = meta is not None and (single_iter is None or meta["iter"] > single_iter
                                            or (fsdp and meta["iter"] == single_iter))
        if meta is not None and single_iter is not None and meta["iter"] != single_iter:
            newer, older = ((sharded, meta["iter"]), (self.ckpt_path, single_iter)) if use_sharded else \
                ((self.ckpt_path, single_iter), (sharded, meta["iter"]))
            self._log(f"resume: {newer[0]} (iter {newer[1]}) is newer than {older[0]} (iter {older[1]}); "
                      f"continuing from it")
        if use_sharded:
            return meta, sharded
        return read_checkpoint(self.ckpt_path, trust=trust), None

    def _restore(self, ck: dict) -> None:
        source = self._resume_dir or self.ckpt_path
        check_compatible(model_config_of(ck, source), self.model_config, source)
        if ck["tokenizer"] != self.tokenizer.to_dict():
            raise CheckpointError(f"checkpoint {source} used a different tokenizer or vocabulary than "
                                  f"this dataset; resume with the same --dataset/--tokenizer, or use a new --out-dir")
        saved_opt = ck.get("train_config", {}).get("optimizer", "adamw")
        if saved_opt != self.cfg.optimizer:
            raise CheckpointError(f"checkpoint {source} was trained with --optimizer {saved_opt}; resume with "
                                  f"--optimizer {saved_opt}, or use a new --out-dir to start fresh")
        fsdp = self.world.parallel == "fsdp"
        if self._resume_dir is not None:  # sharded: DCP reshards to this run (no_dist: every rank reads it all)
            load_sharded(self._resume_dir, self.model, self.optimizer, no_dist=not fsdp)
        elif fsdp:  # a single file into sharded parameters: through a plain copy of the model and optimizer
            plain = GPT(self.model_config, kernels="torch")
            plain_opt = make_optimizer(plain, self.cfg, torch.device("cpu"))
            plain.load_state_dict(ck["model"])
            plain_opt.load_state_dict(ck["optimizer"])
            load_full_state(self.model, self.optimizer, plain, plain_opt)
            del plain, plain_opt
        else:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        per_rank = ck.get("rng_per_rank") or [ck["rng"]]
        saved_world = len(per_rank)
        set_rng_state(per_rank[self.world.rank] if saved_world == self.world.size else per_rank[0])
        self._restore_batches(ck, source)
        self.state = RunState(**ck["run_state"])
        saved_budget = ck.get("train_config", {}).get("time_budget")
        self._saved_budget = saved_budget * 60 if saved_budget else 0.0
        self.resumed_from = source
        self._log(f"resumed from {source} at iter {self.state.iter}")
        if saved_world != self.world.size:
            if self.world.size > 1:
                torch.manual_seed(self.cfg.seed + 1000003 * self.state.iter + self.world.rank)
            self._log(f"note: the checkpoint was written by {saved_world} rank(s), this run has {self.world.size}: "
                      f"model and optimizer state carry over exactly; the batches follow the new world size "
                      f"(the same as before if batch_size x ranks is unchanged), dropout's random streams restart")

    def _restore_batches(self, ck: dict, source: Path) -> None:
        """The train loader's state from a checkpoint: ``data_state`` (train/data/batches.py: windows, the
        generator's state; documents, epoch, cursor, buffer and crop counters), or for a checkpoint from
        before batching modes its ``data_rng`` (windows). The state is the same on every rank, so it
        carries over to another number of ranks too. A checkpoint of the other mode (an explicit --batching
        that differs; auto keeps the checkpoint's), or of a train split with another number of documents,
        cannot be continued: the batches start afresh, with a note."""
        state = ck.get("data_state") or {"mode": "windows", "rng": ck["data_rng"]}
        if state.get("mode") != self.batching:
            self._log(f"note: {source} drew {state.get('mode')} batches, this run draws {self.batching} "
                      f"(--batching {self.cfg.batching}): its batches start afresh from --seed")
            return
        try:
            self.train_loader.load_state_dict(state)
        except ValueError as e:
            self._log(f"note: {e} (the data changed since {source}): its batches start afresh from --seed")

    def checkpoint_state(self, data_state: dict | None = None, torch_rng: dict | None = None,
                         weights: bool = True) -> dict:
        """The checkpoint dict (a collective under torchrun: every rank's RNG state is gathered).
        weights=False leaves out model and optimizer (a sharded checkpoint's meta.pt). data_state: the
        train loader's state to save (default: now, after the batches trained on)."""
        rng = torch_rng if torch_rng is not None else rng_state()
        data_state = data_state if data_state is not None else self.train_loader.state_dict()
        state = {
            "model_config": self.model_config.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "train_config": self.cfg.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iter": self.state.iter,
            "run_state": vars(self.state).copy(),
            "rng": rng,
            "data_state": data_state,
        }
        if data_state["mode"] == "windows":
            state["data_rng"] = data_state["rng"]  # where a checkpoint from before batching modes kept it
        if self.world.size > 1:
            state["rng_per_rank"] = self.world.gather_objects(rng)
        if weights:
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        return state

    @property
    def checkpoint_location(self) -> Path:
        """Where this run's checkpoints go: OUT/ckpt.pt, or OUT/ckpt_sharded under FSDP."""
        return self.out / SHARDED_DIR if self.world.parallel == "fsdp" else self.ckpt_path

    def save(self, best: bool = False, **kw) -> None:
        """Every rank calls this. FSDP: a sharded checkpoint, every rank writing its part. Otherwise rank 0
        writes OUT/ckpt.pt (and ckpt_best.pt), atomically."""
        if self.world.parallel == "fsdp":
            meta = self.checkpoint_state(weights=False, **kw)
            name = f"iter-{self.state.iter:08d}-{self.world.gather_objects(time.time_ns())[0]}"  # rank 0's id
            save_sharded(self.out, name, self.model, self.optimizer, meta if self.world.main else None, best)
            return
        state = self.checkpoint_state(**kw)
        if self.world.main:
            save_checkpoint(state, self.ckpt_path)
            if best:
                save_checkpoint(state, self.out / "ckpt_best.pt")

    def _save_now(self, clock: _Clock, **kw) -> None:
        self.state.elapsed = clock.elapsed()
        self.save(**kw)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss on eval_iters batches of each split, in the training's batching mode; the same batches
        at every eval (each split's eval loader is rewound to its seeded start). Where a split's UTF-8
        size is known, also its bits per byte: loss / ln 2 x the split's tokens / its bytes."""
        self.model.eval()
        out = {}
        # DDP: the wrapped module (no gradient sync to set up); FSDP: the sharded root itself.
        model = self.model if self.world.distributed else self.step_model
        for split, loader in self._eval_loaders.items():
            loader.load_state_dict(self._eval_starts[split])
            total = torch.zeros((), device=self.device)
            for _ in range(self.cfg.eval_iters):
                x, y = loader.next_batch()
                with autocast(self.device, self.dtype):
                    _, loss = model(x, y)
                total += loss.detach().float()
            out[f"{split}_loss"] = self.world.mean(total / self.cfg.eval_iters).item()
        for split, data in self.splits.items():
            if data.n_bytes > 0:
                out[f"{split}_bpb"] = out[f"{split}_loss"] / math.log(2) * data.n_tokens / data.n_bytes
        self.model.train()
        return out

    def _loader(self, split: str, seed: int, prefetch: bool | None = None) -> BatchLoader:
        """This rank's batches of one split in the run's batching mode (train/data/loader.py)."""
        return make_loader(self.splits[split], self.batching, self.cfg.batch_size, self.model_config.block_size,
                           rank=self.world.rank, world=self.world.size, seed=seed, device=self.device,
                           prefetch=prefetch, name=f"the {self.data.name} {split} split")

    def _batching_line(self) -> str:
        """The batching mode (and why, under auto) and the size of each split."""
        sizes = "; ".join(f"{name} {s.n_tokens:,} tokens, {len(s.shards)} shard{'s' * (len(s.shards) != 1)}"
                          + (f", {s.n_docs:,} documents" if s.n_docs else "") for name, s in self.splits.items())
        return f"data: {self.batching} batching{self._batching_why} | {sizes}"

    def _cropped_summary(self) -> str | None:
        """Documents batching: how many of the tokens drawn so far (this run and those it resumed) were cropped."""
        state = self.train_loader.state_dict()
        if state["mode"] != "documents":
            return None
        return (f"documents batching cropped {state['cropped']:,} of the {state['drawn']:,} tokens drawn "
                f"({100 * self.train_loader.cropped_fraction:.1f}%): the tails of documents that did not fit a row")

    # -- the loop -----------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> dict:
        """Run to max_iters (or the time budget). stop_at: pause after that iteration with a checkpoint
        and no final eval, as if interrupted there; a later run with resume=True continues exactly."""
        cfg, st, world = self.cfg, self.state, self.world
        complete = self._complete_reason()
        if complete:  # a finished run resumed as it was: nothing to train, nothing written
            self._log(f"{self.resumed_from} is complete: {complete}; nothing to do. To train further, resume "
                      f"with a larger --max-iters{' or --time-budget' if cfg.time_budget else ''}")
            return {"iters": st.iter, "tokens": st.tokens, "elapsed": st.elapsed, "best_val_loss": st.best_val,
                    "stop_reason": "complete"}
        if world.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resumed_from is not None:
                drop_records_after(self.out / "metrics.jsonl", st.iter)
        st.finished = None
        if warmup_steps(cfg) < cfg.warmup_iters:
            self._log(f"note: warmup shortened from {cfg.warmup_iters} to {warmup_steps(cfg)} steps (at most half "
                      f"of max_iters {cfg.max_iters})")
        self._log(f"model: {self.model.num_params():,} params | kernels {cfg.kernels} -> "
                  f"{self.model.kernels_in_use()} ({self.device.type}) | {self.device} {dtype_name(self.dtype)} | "
                  f"MFU peak {self.peak / 1e12:.2f} TFLOP/s per device ({self.peak_source})")
        ranks = f" x {world.size} ranks ({world.parallel})" if world.distributed else ""
        self._log(f"batch: {cfg.batch_size} sequences{' per rank' if ranks else ''} x {cfg.grad_accum} "
                  f"micro-steps{ranks} = {self.tokens_per_step:,} tokens/step")
        self._log(self._batching_line())
        clock = _Clock(cfg, st.elapsed)
        with contextlib.ExitStack() as stack:
            self._metrics = stack.enter_context(open(self.out / "metrics.jsonl", "a")) if world.main else None
            self._bar = stack.enter_context(_progress(cfg, st.iter, st.elapsed)) if world.main else None
            self._loggers = stack.enter_context(open_loggers(cfg, self.out, world, start_iter=st.iter))  # --log
            stack.enter_context(self._stop_on_signals())
            stack.callback(self.train_loader.close)  # the prefetch thread (it rewinds to the batches trained on)
            try:
                stop_reason = self._run_steps(clock, stop_at)
                if stop_reason == "stop_at":
                    self._save_now(clock)
                    return {"iters": st.iter, "tokens": st.tokens, "elapsed": st.elapsed, "stop_reason": stop_reason}
                st.finished = stop_reason
                if self._last_eval is not None and self._last_eval[0] == st.iter:
                    # The run ends right after an eval (the time budget ran out at an eval step): no second
                    # eval, only a save that records the run as finished.
                    last_eval = self._last_eval[1]
                    self._save_now(clock)
                else:
                    st.elapsed = clock.elapsed()
                    last_eval = self._eval_and_save(clock)
            except KeyboardInterrupt as e:
                saved = isinstance(e, _SavedInterrupt)
                if not saved and not world.distributed:  # between steps (logging, eval): the state is consistent
                    self._save_now(clock)
                    saved = True
                where = self.checkpoint_location
                if world.main and saved:
                    print(f"\ninterrupted: checkpoint saved to {where} at iter {st.iter}; continue with --resume",
                          file=sys.stderr)
                elif world.main:  # ranks may be anywhere in a collective: no save that needs them all
                    print(f"\ninterrupted mid-step: no checkpoint written now; --resume continues from the last "
                          f"one in {where}", file=sys.stderr)
                raise
            self._write(f"done ({stop_reason}): {st.iter} iters, {st.tokens:,} tokens in {_hms(st.elapsed)}; "
                        f"val loss {last_eval['val_loss']:.4f} (best {st.best_val:.4f}); checkpoint {self.checkpoint_location}")
            if (cropped := self._cropped_summary()) is not None:
                self._write(cropped)
        if world.parallel == "fsdp":
            self._consolidate()
        return {"iters": st.iter, "tokens": st.tokens, "elapsed": st.elapsed, **last_eval,
                "best_val_loss": st.best_val, "stop_reason": stop_reason}

    def _consolidate(self) -> None:
        """After an FSDP run: rank 0 writes ckpt.pt (and ckpt_best.pt) from the sharded checkpoint, for
        the sampler and the evaluator; the other ranks wait."""
        if self.world.main:
            for path in consolidate(self.out):
                self._write(f"consolidated {path}")
        self.world.barrier()

    def _run_steps(self, clock: _Clock, stop_at: int | None) -> str:
        """Optimizer steps until one of the stop reasons ("max_iters", "time budget", "stop_at")."""
        cfg, st = self.cfg, self.state
        self.model.train()
        meter = _Meter(st.iter)
        while st.iter < cfg.max_iters:
            # One all-reduce under torchrun: a signal on any rank, or any rank's clock, stops them all here.
            signalled, out_of_time = self.world.any(self._stop_signal is not None, clock.out_of_time(),
                                                    device=self.device)
            if signalled:  # Ctrl-C / SIGTERM during the last step: stop at this boundary
                if self._stop_signal is None and self.world.main:
                    print("\nanother rank was signalled: stopping after this step", file=sys.stderr)
                self._save_now(clock)
                raise _SavedInterrupt
            if stop_at is not None and st.iter >= stop_at:
                return "stop_at"
            if out_of_time:
                return "time budget"
            lr = self._set_lr(clock)
            loss = self._step_or_save_boundary(clock)
            st.iter += 1
            st.tokens += self.tokens_per_step
            meter.add(loss, self.tokens_per_step)
            self._advance_bar(clock)
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
        data_state, torch_rng = self.train_loader.state_dict(), rng_state()
        try:
            return self._step()
        except KeyboardInterrupt:  # a second Ctrl-C, or no signal handler in this thread
            if self.world.distributed:  # the other ranks may be inside this step's collectives
                raise
            self.optimizer.zero_grad(set_to_none=True)
            self._save_now(clock, data_state=data_state, torch_rng=torch_rng)
            raise _SavedInterrupt from None

    def _step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns their mean loss."""
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        for i in range(cfg.grad_accum):
            x, y = self.train_loader.next_batch()
            with grad_sync(self.step_model, self.world, sync=i == cfg.grad_accum - 1):
                with autocast(self.device, self.dtype):
                    _, loss = self.step_model(x, y, z_loss=cfg.z_loss)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.detach().float()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip_grad_norm(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return self.world.mean(total / cfg.grad_accum).item()  # every rank: the same mean, the same decisions

    # -- logging ------------------------------------------------------------------------------
    def _log_progress(self, meter: _Meter, lr: float, clock: _Clock) -> None:
        """The log line and a metrics.jsonl record: mean loss, tokens/s and MFU since the last one, ETA."""
        st = self.state
        mean_loss = meter.loss_sum / meter.steps
        if not math.isfinite(mean_loss):
            raise TrainingError(
                f"loss is {mean_loss} at iter {st.iter}; stopped. The last good checkpoint ({self.ckpt_path}) is "
                f"untouched. Lower --lr, raise --warmup-iters, or use --dtype bfloat16/float32")
        tps = meter.tokens / max(time.perf_counter() - meter.window_t, 1e-9)  # all ranks together
        mfu = self.flops_per_token * tps / (self.peak * self.world.size)  # per device
        elapsed = clock.elapsed()
        remaining = clock.remaining(st.iter, meter.seconds_per_iter(st.iter))
        self._record({"iter": st.iter, "loss": mean_loss, "lr": lr, "tok_per_s": tps, "mfu": mfu,
                      "tokens": st.tokens, "elapsed": elapsed})
        # iter N/max_iters where the step count ends the run first; elapsed/budget whenever there is a budget.
        per_iter = meter.seconds_per_iter(st.iter)
        steps = f"/{self.cfg.max_iters}" if clock.iters_end_first(st.iter, per_iter) else ""
        budget = f"/{_hms(clock.budget)}" if clock.budget is not None else ""
        self._write(f"iter {st.iter:>6}{steps} | loss {mean_loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                    f"MFU {100 * mfu:.1f}% | elapsed {_hms(elapsed)}{budget} | ETA {_hms(remaining)}")
        meter.restart()

    def _advance_bar(self, clock: _Clock) -> None:
        """One step on the bar: a step of max_iters, or the time spent of the budget (with the step count)."""
        bar = self._bar
        if bar is None:
            return
        if self.cfg.time_budget:
            bar.set_postfix_str(f"iter {self.state.iter}", refresh=False)
            bar.update(max(min(clock.elapsed(), bar.total) - bar.n, 0))
        else:
            bar.update(1)

    def _record(self, rec: dict) -> None:
        if self._metrics is not None:  # rank 0
            self._metrics.write(json.dumps(rec) + "\n")
            self._metrics.flush()
            self._loggers.log(rec, step=rec["iter"])  # TensorBoard / W&B (--log)

    def _log(self, msg: str) -> None:
        if self.world.main:
            _log(msg)

    def _write(self, msg: str) -> None:
        """A log line on stdout (rank 0), printed above the progress bar when there is one."""
        if not self.world.main:
            return
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
        cropped = self.train_loader.cropped_fraction  # documents batching only
        extra = {} if cropped is None else {"cropped_fraction": cropped}
        self._record({"iter": st.iter, **ev, **extra, "tokens": st.tokens, "elapsed": st.elapsed})
        bpb = f" | bpb train {ev['train_bpb']:.4f} val {ev['val_bpb']:.4f}" if "val_bpb" in ev and "train_bpb" in ev else ""
        crop = f" | cropped {100 * cropped:.1f}%" if cropped is not None else ""
        self._write(f"eval @ {st.iter}: train {ev['train_loss']:.4f} | val {ev['val_loss']:.4f}"
                    f"{' (best)' if best else ''}{bpb}{crop} | saved {self.checkpoint_location}")
        if self.world.main:
            plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png")
        self._last_eval = (st.iter, ev)
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
                if self.world.distributed:  # torchrun forwards the terminal's Ctrl-C too: one stop is enough
                    return
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.world.main or self.world.size == 1:
                again = "" if self.world.distributed else " (again to stop now)"
                print(f"\n{signal.Signals(signum).name}: stopping after this step{again}", file=sys.stderr)
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


def _progress(cfg: TrainConfig, start: int, elapsed: float):
    """The run's progress bar, or a null context when cfg.progress is off or tqdm is missing: in steps
    of max_iters, or in seconds of the time budget when there is one (see _advance_bar)."""
    if not cfg.progress:
        return contextlib.nullcontext()
    if cfg.time_budget:
        budget = cfg.time_budget * 60
        bar = progress_bar(total=budget, initial=min(elapsed, budget), dynamic_ncols=True,
                           bar_format="{percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of the time budget{postfix}")
    else:
        bar = progress_bar(total=cfg.max_iters, initial=start, unit="it", dynamic_ncols=True)
    return contextlib.nullcontext() if bar is None else bar


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _record_iter(line: str) -> float:
    """A metrics.jsonl line's iteration; infinity for a line torn by a kill mid-write (always dropped)."""
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def drop_records_after(metrics_path: Path, last_iter: int) -> None:
    """Remove the records of iterations after `last_iter` from metrics.jsonl: a run resumed from the
    checkpoint of `last_iter` redoes them, and a killed process may have logged some past its last
    checkpoint. The file is rewritten (atomically) only if there is something to drop."""
    if not metrics_path.exists():
        return
    lines = metrics_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _record_iter(line) <= last_iter]
    if len(kept) != len(lines):
        with atomic_open(metrics_path, "w", encoding="utf-8") as f:
            f.writelines(kept)


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """loss.png: train loss per log interval and the eval train/val losses, against iterations."""
    train, evals = {}, {}
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            (evals if "val_loss" in rec else train)[rec["iter"]] = rec  # a resumed run overwrites its own iters
    from matplotlib.figure import Figure   # here, not at the top: ~0.4 s of every command's start-up
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
    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, format="png")
