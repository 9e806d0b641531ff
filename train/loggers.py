"""Optional experiment trackers: TensorBoard and Weights & Biases, on rank 0 only.

`metrics.jsonl` stays the record of a run; `--log tensorboard`, `--log wandb` or `--log tensorboard,wandb`
also send every one of its records to these trackers, as scalars at step = the record's iter:

- a log line's record -> ``train/loss``, ``train/lr``, ``train/tok_per_s``, ``train/mfu``,
  ``train/tokens``, ``train/elapsed``;
- an eval's record -> ``eval/train_loss``, ``eval/val_loss``, ``eval/tokens``, ``eval/elapsed``
  (`scalars` below is the mapping).

TensorBoard writes event files to OUT/tensorboard (`tensorboard --logdir OUT/tensorboard`), flushed at
every eval. A run started at iter k (a --resume) purges the events after k that an earlier process left
there, so a resumed run's curves join the checkpoint's, as metrics.jsonl's plot does.

W&B: `wandb.init(project=--wandb-project, name=--wandb-run-name or OUT's name, dir=OUT, config=the train
config, id=..., resume="allow")`. The run id is kept in OUT/wandb_run_id: a --resume run reads it and
continues the same W&B run; a fresh run in OUT starts a new W&B run (and a new id). The usual W&B
environment applies (WANDB_MODE=offline, then `wandb sync OUT/wandb/offline-run-*`; WANDB_ENTITY, ...).

Neither package is imported unless chosen: `require(cfg)` imports the chosen ones when the Trainer starts,
before any data work, and a missing one is the standard one-line error (gpt/optional.py).
"""
from __future__ import annotations

import secrets
import string
from pathlib import Path
from types import ModuleType

from gpt.errors import ConfigError
from gpt.optional import import_optional

LOGGERS = ("none", "tensorboard", "wandb")
RUN_ID_FILE = "wandb_run_id"  # in the out dir: the W&B run a --resume continues
TENSORBOARD_DIR = "tensorboard"


def chosen(log: str) -> list[str]:
    """The trackers named by a `log` setting ("none", "tensorboard", "wandb", "tensorboard,wandb", or a
    list of names from a config file), in order, without "none"; a ConfigError for anything else."""
    names = [str(n).strip() for n in (log if isinstance(log, (list, tuple)) else str(log).split(","))]
    bad = [n for n in names if n not in LOGGERS]
    if bad or ("none" in names and len(names) > 1) or len(set(names)) != len(names):
        raise ConfigError(f"unknown log {log!r}; choose one of: {', '.join(LOGGERS)}, or a comma-separated list "
                          f"of trackers (tensorboard,wandb)")
    return [n for n in names if n != "none"]


def scalars(record: dict) -> dict[str, float]:
    """The tracker scalars of a metrics.jsonl record: its numeric fields but iter, under "eval/" for an
    eval's record (it has val_loss) and "train/" for a log line's."""
    kind = "eval" if "val_loss" in record else "train"
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k != "iter" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _tensorboard() -> ModuleType:
    """torch.utils.tensorboard, once the `tensorboard` package itself is known to import (torch's module
    imports it and would otherwise report a missing dependency of torch)."""
    import_optional("tensorboard", "--log tensorboard", "or use --log none (metrics.jsonl holds the same numbers)")
    return import_optional("torch.utils.tensorboard", "--log tensorboard", pip_name="tensorboard")


def _wandb() -> ModuleType:
    return import_optional("wandb", "--log wandb", "or use --log none (metrics.jsonl holds the same numbers)")


_IMPORTERS = {"tensorboard": _tensorboard, "wandb": _wandb}


def require(cfg) -> None:
    """Import the trackers cfg.log names: a missing package is a ConfigError now, before any training."""
    for name in chosen(cfg.log):
        _IMPORTERS[name]()


class MetricsLogger:
    """Where metrics.jsonl's records also go. This base class drops them: `--log none`, and every rank but 0.
    A context manager: leaving it closes the trackers (reporting a failure if an exception is leaving)."""

    def log(self, record: dict, step: int) -> None:
        """One metrics.jsonl record (a log line's or an eval's), at optimizer step `step`."""

    def close(self, exit_code: int = 0) -> None:
        """Flush and close; exit_code: 0 for a run that ended normally (or paused), else what went wrong."""

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(0 if exc_type is None else 130 if issubclass(exc_type, KeyboardInterrupt) else 1)


class TensorBoardLogger(MetricsLogger):
    def __init__(self, out_dir: Path, start_iter: int = 0):
        tb = _tensorboard()
        # purge_step: events an earlier process wrote after the checkpoint this run starts from are dropped.
        self.writer = tb.SummaryWriter(log_dir=str(Path(out_dir) / TENSORBOARD_DIR), purge_step=start_iter + 1)

    def log(self, record: dict, step: int) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)
        if "val_loss" in record:
            self.writer.flush()

    def close(self, exit_code: int = 0) -> None:
        self.writer.close()


class WandbLogger(MetricsLogger):
    def __init__(self, cfg, out_dir: Path):
        wandb = _wandb()
        out_dir = Path(out_dir)
        id_file = out_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if cfg.resume and id_file.exists() else ""
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or out_dir.resolve().name,
                              dir=str(out_dir), config=cfg.to_dict(), id=run_id, resume="allow")

    def log(self, record: dict, step: int) -> None:
        self.run.log(scalars(record), step=step)

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class _All(MetricsLogger):
    """Several trackers at once (--log tensorboard,wandb)."""

    def __init__(self, loggers: list[MetricsLogger]):
        self.loggers = loggers

    def log(self, record: dict, step: int) -> None:
        for logger in self.loggers:
            logger.log(record, step)

    def close(self, exit_code: int = 0) -> None:
        for logger in reversed(self.loggers):
            logger.close(exit_code)


def open_loggers(cfg, out_dir: str | Path, world=None, start_iter: int = 0) -> MetricsLogger:
    """The trackers cfg.log names, open (rank 0 only; a no-op logger elsewhere and for "none").
    out_dir must exist. start_iter: the iteration the run starts from (a resumed run's checkpoint)."""
    names = chosen(cfg.log)
    if not names or (world is not None and not world.main):
        return MetricsLogger()
    opened: list[MetricsLogger] = []
    try:
        for name in names:
            opened.append(TensorBoardLogger(out_dir, start_iter) if name == "tensorboard" else WandbLogger(cfg, out_dir))
    except BaseException:
        _All(opened).close(1)
        raise
    return opened[0] if len(opened) == 1 else _All(opened)
