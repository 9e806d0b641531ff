"""Training configuration: one dataclass with commented defaults, per-preset defaults, file loading."""
from __future__ import annotations

import runpy
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from gpt.config import PRESETS, GPTConfig, preset_config
from gpt.errors import ConfigError
from gpt.ops import FUSED_LOSS_MODES, KERNEL_MODES

from .loggers import chosen as chosen_loggers

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "linear")  # the shape of the decay from lr to min_lr (train/loop.py lr_at)
PARALLEL_MODES = ("auto", "ddp", "fsdp")  # see train/distributed.py
BATCHING_MODES = ("auto", "windows", "documents")  # see train/data/batches.py


@dataclass
class TrainConfig:
    # model
    preset: str = "tiny"               # tiny | small | medium | large (gpt/config.py)
    model: dict = field(default_factory=dict)  # GPTConfig overrides, e.g. {"n_layer": 4, "dropout": 0.1}
    # data
    dataset: str = "shakespeare"       # "shakespeare" or a text file / directory / glob
    tokenizer: str = "char"            # char | bpe | gpt2
    vocab_size: int | None = None      # bpe vocabulary (default 8192); the model's vocab follows the tokenizer
    data_dir: str = "data"             # tokenized datasets are cached here
    hf_dataset: str | None = None      # a Hugging Face dataset name or local file instead of `dataset`
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    val_fraction: float | None = None  # the val share (default 0.1): by position under 100 documents, else whole documents
    tokenizer_sample: float = 100.0    # MB of documents (a deterministic sample) a bpe tokenizer is trained on
    shard_tokens: int = 100_000_000    # about this many tokens per prepared shard
    workers: int | None = None         # tokenizing processes when preparing data (default: the cores)
    batching: str = "auto"             # windows | documents (rows start at documents) | auto (documents when split by document)
    # optimisation
    optimizer: str = "adamw"           # adamw | muon (Muon for the blocks' matrices, AdamW for the rest; train/optim.py)
    batch_size: int = 32               # sequences per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    max_iters: int = 2000              # optimizer steps (the schedule's length unless time_budget ends sooner)
    lr: float = 1e-3                   # peak learning rate (AdamW; with muon: the embedding, head and norms)
    matrix_lr: float = 0.02            # peak learning rate of Muon's matrices (optimizer = "muon")
    momentum: float = 0.95             # Muon's Nesterov momentum
    min_lr: float = 1e-4               # the rate at the end of the decay
    schedule: str = "cosine"           # cosine | linear: the decay's shape
    decay_frac: float = 1.0            # the last fraction of the run that decays; before it, the peak rate
    warmup_iters: int = 100            # linear warmup steps
    weight_decay: float = 0.1          # on 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # max global grad norm; 0 disables
    # runtime
    device: str = "auto"               # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"                # auto | float32 | bfloat16 | float16 (autocast; see gpt/runtime.py)
    kernels: str = "auto"              # auto | triton | torch (gpt/ops.py): a run-time choice, not saved with the model
    fused_loss: str = "auto"           # auto | on | off: the head and the loss as one op (gpt/ops.py); run-time, not saved with the model
    z_loss: float = 0.0                # adds z_loss * mean(lse^2) of the logits to the train loss (PaLM); 0: off
    compile: bool = False              # torch.compile the model
    parallel: str = "auto"             # under torchrun: ddp | fsdp (auto: ddp when several ranks; train/distributed.py)
    gradient_checkpointing: bool = False  # recompute each block in the backward: less memory, ~30% more compute
    seed: int = 1337
    time_budget: float | None = None   # minutes of wall clock (evals included); the LR schedule fits it
    # evaluation, logging, checkpoints
    eval_interval: int = 250           # steps between evals (and checkpoints)
    eval_iters: int = 20               # batches per split per eval
    log_interval: int = 10             # steps between log lines
    out_dir: str = "out"               # ckpt.pt (last), ckpt_best.pt (best val), metrics.jsonl, loss.png
    resume: bool = False               # continue exactly from out_dir/ckpt.pt
    init_from: str | None = None       # a Hugging Face Llama folder: start from its weights and tokenizer
    progress: bool = True              # tqdm bar on stderr (only on a terminal)
    log: str = "none"                  # none | tensorboard | wandb | tensorboard,wandb: also send metrics there (rank 0)
    wandb_project: str = "tritongpt"   # W&B project (log = "wandb")
    wandb_run_name: str | None = None  # W&B run name (default: out_dir's name)

    def to_dict(self) -> dict:
        return asdict(self)

    def model_config(self, vocab_size: int) -> GPTConfig:
        return preset_config(self.preset, vocab_size=vocab_size, **self.model)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        unknown = sorted(set(self.model) - MODEL_FIELDS)
        if unknown:
            raise ConfigError(f"unknown model field(s) {unknown}; known: {', '.join(sorted(MODEL_FIELDS))}")
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.kernels not in KERNEL_MODES:
            raise ConfigError(f"unknown kernels {self.kernels!r}; choose one of: {', '.join(KERNEL_MODES)}")
        if self.fused_loss not in FUSED_LOSS_MODES:
            raise ConfigError(f"unknown fused_loss {self.fused_loss!r}; choose one of: {', '.join(FUSED_LOSS_MODES)}")
        if not 0 <= self.z_loss < float("inf"):
            raise ConfigError(f"z_loss is a coefficient >= 0 (PaLM used 1e-4), got {self.z_loss}")
        if self.parallel not in PARALLEL_MODES:
            raise ConfigError(f"unknown parallel mode {self.parallel!r}; choose one of: {', '.join(PARALLEL_MODES)}")
        if self.batching not in BATCHING_MODES:
            raise ConfigError(f"unknown batching {self.batching!r}; choose one of: {', '.join(BATCHING_MODES)}")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.shard_tokens < 1 << 16:
            raise ConfigError(f"shard_tokens must be at least 65536, got {self.shard_tokens}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.tokenizer_sample <= 0:
            raise ConfigError(f"tokenizer_sample is in MB and must be positive, got {self.tokenizer_sample}")
        if self.matrix_lr <= 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"need matrix_lr > 0 and 0 <= momentum < 1, got {self.matrix_lr}, {self.momentum}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if not 0 < self.decay_frac <= 1:
            raise ConfigError(f"decay_frac is the fraction of the run that decays, in (0, 1]; got {self.decay_frac}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ConfigError(f"time_budget is in minutes and must be positive, got {self.time_budget}")
        trackers = chosen_loggers(self.log)  # an unknown name: a ConfigError naming the valid ones
        if "wandb" in trackers and not str(self.wandb_project).strip():
            raise ConfigError("log wandb needs a --wandb-project name")


# Defaults per model preset, chosen for the hardware each preset targets (tiny: a laptop CPU).
TRAIN_PRESETS: dict[str, dict] = {
    "tiny":   dict(batch_size=32, lr=2e-3, min_lr=2e-4, warmup_iters=100, beta2=0.99),
    "small":  dict(batch_size=32, lr=1e-3, min_lr=1e-4, warmup_iters=200),
    "medium": dict(batch_size=16, grad_accum=2, lr=6e-4, min_lr=6e-5, warmup_iters=500, max_iters=10000),
    "large":  dict(batch_size=8, grad_accum=4, lr=3e-4, min_lr=3e-5, warmup_iters=1000, max_iters=20000),
}

TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
# GPTConfig fields a run may set (flags, config files); the vocabulary follows the tokenizer.
MODEL_FIELDS = {f.name for f in fields(GPTConfig)} - {"vocab_size"}


def load_config_file(path: str | Path) -> dict:
    """Settings from a .toml file or a .py file (its top-level names). Train and model field names
    are both accepted; model fields may also sit under a [model] table / `model = {...}` dict."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    elif path.suffix == ".py":
        raw = {k: v for k, v in runpy.run_path(str(path)).items() if not k.startswith("_")}
        raw = {k: v for k, v in raw.items() if not callable(v) and not hasattr(v, "__file__")}
    else:
        raise ConfigError(f"config file {path}: use a .toml or .py file")
    out: dict = {}
    for k, v in raw.items():
        k = k.replace("-", "_")
        if k == "model" and isinstance(v, dict):
            model = {mk.replace("-", "_"): mv for mk, mv in v.items()}
            misplaced = sorted(set(model) & (TRAIN_FIELDS - MODEL_FIELDS))
            if misplaced:
                raise ConfigError(f"config file {path}: {', '.join(misplaced)} is a run setting, not part of the "
                                  f"model: move it out of [model] to the top level of the file")
            out.setdefault("model", {}).update(model)
        elif k in TRAIN_FIELDS:
            out[k] = v
        elif k in MODEL_FIELDS:
            out.setdefault("model", {})[k] = v
        else:
            raise ConfigError(f"config file {path}: unknown setting {k!r}")
    return out


def resolve_config(cli: dict, config_file: str | None = None) -> TrainConfig:
    """Defaults < the preset's training defaults < the config file < command-line flags."""
    file_settings = load_config_file(config_file) if config_file else {}
    preset = cli.get("preset") or file_settings.get("preset") or TrainConfig.preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    settings: dict = dict(TRAIN_PRESETS.get(preset, {}))
    model: dict = {}
    for layer in (file_settings, cli):
        for k, v in layer.items():
            if v is None:
                continue
            if k == "model":
                model.update(v)
            else:
                settings[k] = v
    cfg = TrainConfig(**{**settings, "model": model})
    cfg.validate()
    return cfg
