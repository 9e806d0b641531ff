"""Model configuration: one dataclass with commented defaults, and named presets.

GPTConfig describes the architecture only: what a checkpoint needs to rebuild the weights. Run-time
choices (kernels, gradient checkpointing, device, dtype, compile) are arguments of `GPT` and the CLIs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .errors import ConfigError


def _round_up(n: float, multiple: int) -> int:
    return int(-(-int(n) // multiple) * multiple)


@dataclass
class GPTConfig:
    block_size: int = 1024        # longest context the model attends over (RoPE table length)
    vocab_size: int = 8192        # tokenizer vocabulary; tied input/output embedding rows
    n_layer: int = 12             # transformer blocks
    n_head: int = 12              # query heads
    n_kv_head: int = 4            # key/value heads: == n_head is MHA, 1 is MQA, between is GQA
    n_embd: int = 768             # residual stream width; head_dim = n_embd // n_head
    mlp: str = "swiglu"           # "swiglu" (gated, 3 matrices) or "gelu" (2 matrices)
    mlp_ratio: float = 4.0        # hidden = ratio * n_embd for gelu, 2/3 of that for swiglu (same params)
    mlp_hidden: int | None = None # explicit MLP hidden size; overrides mlp_ratio
    norm: str = "rms"             # "rms" (RMSNorm) or "layer" (LayerNorm)
    norm_eps: float = 1e-6
    bias: bool = False            # biases in Linear layers and LayerNorm
    dropout: float = 0.0          # on embeddings and on each residual branch (not on attention weights)
    tie_weights: bool = True      # lm_head shares the token embedding matrix
    rope_theta: float = 10000.0   # RoPE base
    init_std: float = 0.02        # weights ~ N(0, init_std); residual projections scaled by 1/sqrt(2*n_layer)

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_size(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        hidden = self.mlp_ratio * self.n_embd
        if self.mlp == "swiglu":
            # Three matrices instead of two: 2/3 of the width keeps the parameter count; a multiple
            # of 64 keeps matmul tiles full.
            return _round_up(hidden * 2 / 3, 64)
        return int(hidden)

    def validate(self) -> None:
        def bad(field, problem, fix):
            raise ConfigError(f"GPTConfig.{field}: {problem}; {fix}")

        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, f"must be a positive integer, got {getattr(self, name)!r}", "set it to 1 or more")
        if self.n_embd % self.n_head:
            bad("n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}",
                "choose n_embd as a multiple of n_head")
        if self.n_head % self.n_kv_head:
            bad("n_kv_head", f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}",
                "choose n_kv_head among the divisors of n_head")
        if self.head_dim % 2:
            bad("n_head", f"head_dim = n_embd/n_head = {self.head_dim} is odd and RoPE rotates pairs",
                "choose n_embd and n_head so that n_embd/n_head is even")
        if self.mlp not in ("swiglu", "gelu"):
            bad("mlp", f"unknown MLP {self.mlp!r}", "use 'swiglu' or 'gelu'")
        if self.norm not in ("rms", "layer"):
            bad("norm", f"unknown norm {self.norm!r}", "use 'rms' or 'layer'")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"{self.dropout} is outside [0, 1)", "use a probability such as 0.0 or 0.1")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            bad("mlp_hidden", f"must be positive, got {self.mlp_hidden}", "leave it None to use mlp_ratio")
        if self.rope_theta <= 0:
            bad("rope_theta", f"must be positive, got {self.rope_theta}", "10000.0 is the usual value")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"GPTConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


# Nominal sizes at an 8192-token vocabulary (exact counts: docs/architecture.md, tests/gpt/test_config.py).
PRESETS: dict[str, dict] = {
    "tiny":   dict(n_layer=5,  n_head=6,  n_kv_head=2, n_embd=384,  block_size=256),   # ~10M
    "small":  dict(n_layer=8,  n_head=8,  n_kv_head=4, n_embd=512,  block_size=512),   # ~25M
    "medium": dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768,  block_size=1024),  # ~80M
    "large":  dict(n_layer=24, n_head=18, n_kv_head=6, n_embd=1152, block_size=1024),  # ~350M
}
NOMINAL_PARAMS = {"tiny": 10e6, "small": 25e6, "medium": 80e6, "large": 350e6}


def preset_config(preset: str, **overrides) -> GPTConfig:
    """The named preset with `overrides` applied (unknown preset or field: ConfigError)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    base = GPTConfig.__dataclass_fields__
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ConfigError(f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(base)}")
    return replace(GPTConfig(**PRESETS[preset]), **overrides)
