"""The GPT: pre-norm blocks of grouped-query attention with RoPE and a SwiGLU MLP, RMSNorm, tied
embeddings. Every hot op goes through an op table from gpt/ops.py (the Triton kernels or PyTorch),
which the model resolves once per device."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import KernelsUnavailable

from .config import GPTConfig, preset_config
from .generation.api import generate
from .ops import check_fused_loss_mode, check_mode, resolve_fused_loss, select as select_ops


def rope_table(block_size: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (block_size, head_dim // 2) in fp32: angle(t, i) = t * theta^(-2i/head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


def rope_qk(op, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """op.rope_qk with tables (T, D/2) shared by every row, or (B, T, D/2), each row at its own positions
    (rows of a KV cache with different lengths): then rows and positions are one axis of the op's
    (1, H, B*T, D) input, which the kernels' (T, D/2) table contract covers; both views are free."""
    if cos.dim() == 2:
        return op.rope_qk(q, k, cos, sin)
    B, T = q.shape[0], q.shape[2]

    def flat(x):   # (B, H, T, D) -> (1, H, B*T, D)
        return x.transpose(1, 2).reshape(1, B * T, x.shape[1], x.shape[3]).transpose(1, 2)

    def back(x):
        return x.transpose(1, 2).reshape(B, T, x.shape[1], x.shape[3]).transpose(1, 2)

    q, k = op.rope_qk(flat(q), flat(k), cos.reshape(B * T, -1), sin.reshape(B * T, -1))
    return back(q), back(k)


class Norm(nn.Module):
    """RMSNorm (through ops, with an optional fused residual add) or LayerNorm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind, self.eps = config.norm, config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if (config.bias and config.norm == "layer") else None

    def forward(self, x, op, residual=None):
        """Returns norm(x), or (norm(x + residual), x + residual) when `residual` is given."""
        if self.kind == "rms":
            return op.rms_norm(x, self.weight, self.eps, residual=residual)
        h = x if residual is None else x + residual
        y = F.layer_norm(h, (h.shape[-1],), self.weight, self.bias, self.eps)
        return y if residual is None else (y, h)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # One matmul for q, k and v: c_attn's output rows are [q: H*D | k: Hkv*D | v: Hkv*D].
        self.qkv_sizes = [config.n_head * config.head_dim, config.n_kv_head * config.head_dim,
                          config.n_kv_head * config.head_dim]
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True

    def forward(self, x, cos, sin, op, cache=None, layer: int = 0):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)      # (B, H, T, D), a strided view
        k = k.view(B, T, Hkv, D).transpose(1, 2)    # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        q, k = rope_qk(op, q, k, cos, sin)         # one launch for both (Triton path)
        if cache is None:
            y = op.attention(q, k, v, causal=True)  # (B, H, T, D)
        else:                                       # stores k, v, attends over what the cache holds
            y = cache.attend(layer, q, k, v, op)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind, hidden = config.mlp, config.hidden_size
        # SwiGLU: one matmul produces [gate | up] (c_fc's output rows); the kernel reads the halves in place.
        self.fc_sizes = [hidden, hidden] if self.kind == "swiglu" else [hidden]
        self.c_fc = nn.Linear(config.n_embd, sum(self.fc_sizes), bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True

    def forward(self, x, op):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            h = op.swiglu_packed(h)                 # silu(h[..., :N]) * h[..., N:], one gradient buffer
        else:
            h = F.gelu(h, approximate="tanh")
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm_attn, self.attn = Norm(config), Attention(config)
        self.norm_mlp, self.mlp = Norm(config), MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, op, cache=None, layer: int = 0):
        a = self.dropout(self.attn(self.norm_attn(x, op), cos, sin, op, cache, layer))
        # Fused: h = x + a and its norm in one pass. The residual stream x goes first: h takes its
        # dtype, so under autocast the stream stays fp32 while a is bf16.
        y, h = self.norm_mlp(x, op, residual=a)
        return h + self.dropout(self.mlp(y, op))


class GPT(nn.Module):
    """The model of `config`. Run-time choices, not saved with the weights:

    kernels: "auto" | "triton" | "torch" (gpt/ops.py), resolved for the device of the weights now and
        again whenever the model is moved (`.to`, `.cuda`, ...); see `use_kernels`.
    gradient_checkpointing: recompute each block in the backward instead of keeping its activations.
    fused_loss: "auto" | "on" | "off": with targets, the head and the loss as one op
        (`ops.linear_cross_entropy`) that never holds the (B, T, vocab) logits; auto: on where that saves
        memory (gpt/ops.py, resolve_fused_loss). See `use_fused_loss`.
    """

    def __init__(self, config: GPTConfig, kernels: str = "auto", gradient_checkpointing: bool = False,
                 fused_loss: str = "auto"):
        super().__init__()
        self.config = config
        self.use_fused_loss(fused_loss)
        self.gradient_checkpointing = gradient_checkpointing
        self.quantized_param_counts: tuple[int, int] | None = None  # set by gpt.quantize.quantize_int8
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = Norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        cos, sin = rope_table(config.block_size, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        self.use_kernels(kernels)

    # -- kernels: a run-time choice, resolved per device --------------------------------------------
    def use_kernels(self, mode: str) -> "GPT":
        """Run the hot ops with `mode` ("auto" | "triton" | "torch") from now on; returns the model."""
        self.kernels = check_mode(mode)
        self._bind_ops()
        return self

    def _bind_ops(self) -> None:
        # 'triton' on a device where it cannot run is not an error until the model runs there: it may
        # be built on the CPU and moved to a GPU next.
        try:
            self.ops, self._ops_error = select_ops(self.kernels, self.wte.weight.device), None
        except KernelsUnavailable as e:
            self.ops, self._ops_error = None, str(e)

    def _apply(self, fn, *args, **kwargs):
        # Every move or cast (.to, .cuda, .cpu, .half, ...) goes through here: resolve for the new device.
        out = super()._apply(fn, *args, **kwargs)
        self._bind_ops()
        return out

    def use_fused_loss(self, mode: str) -> "GPT":
        """Compute the loss with the fused head ("on"), from materialized logits ("off"), or as "auto"
        decides for this model's shape; from now on. Returns the model."""
        self.fused_loss = check_fused_loss_mode(mode)
        return self

    def fused_loss_in_use(self) -> bool:
        """True when forward(idx, targets) computes the loss with the fused head (and returns no logits).
        A quantized head (gpt.quantize, int8 buffers) always takes the unfused path."""
        return type(self.lm_head) is nn.Linear and \
            resolve_fused_loss(self.fused_loss, self.config.vocab_size, self.config.n_embd)

    def kernels_in_use(self) -> str:
        """'triton' or 'torch' on the model's current device (KernelsUnavailable where 'triton' cannot run)."""
        if self.ops is None:
            raise KernelsUnavailable(self._ops_error)
        return self.ops.name

    def block_matrices(self) -> list[tuple[nn.Parameter, list[int]]]:
        """The 2-D weights inside the blocks, each with the row sizes of the logical matrices packed in
        it: [q, k, v] for the attention input, [gate, up] for the SwiGLU input, one part otherwise."""
        out = []
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            out += [(attn.c_attn.weight, attn.qkv_sizes), (attn.c_proj.weight, [attn.c_proj.weight.shape[0]]),
                    (mlp.c_fc.weight, mlp.fc_sizes), (mlp.c_proj.weight, [mlp.c_proj.weight.shape[0]])]
        return out

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            # GPT-2: residual projections scaled so the residual stream's variance does not grow with depth.
            if getattr(module, "residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def extra_repr(self) -> str:
        c = self.config
        device = self.wte.weight.device
        choice = f"{self.kernels} -> {self.ops.name} ({device.type})" if self.ops is not None else \
            f"{self.kernels} (unavailable on {device.type})"
        return (f"params={self.num_params():,}, layers={c.n_layer}, heads={c.n_head}/{c.n_kv_head} (q/kv), "
                f"d_model={c.n_embd}, kernels={choice}, fused_loss={self.fused_loss} -> "
                f"{'on' if self.fused_loss_in_use() else 'off'}")

    def cast_weights_(self, dtype: torch.dtype) -> "GPT":
        """Store the parameters in `dtype` for inference (half the bytes read per decoded token in
        bf16); the RoPE tables stay fp32. Training keeps fp32 weights and uses autocast instead."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self

    # -- accounting ---------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, a tied matrix counted once; non_embedding drops the token embedding. After
        gpt.quantize.quantize_int8 (whose int8 weights are buffers): the counts from before it."""
        if self.quantized_param_counts is not None:
            return self.quantized_param_counts[bool(non_embedding)]
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, T: int) -> float:
        """Training FLOPs per token at context T (forward + backward): 6N + 12*L*H*D*T.

        6N: 2 FLOPs per weight per token forward, 4 backward; the tied lm_head matmul is a real
        matmul, so N keeps the embedding once. 12*L*H*D*T: QK^T and PV (2*2*H*D*T forward, x3 with
        backward), counted without the causal halving, as in PaLM/nanoGPT's MFU.
        """
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * T

    # -- forward ------------------------------------------------------------------------------
    def hidden_states(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """Final normed hidden states (B, T, C) of token ids idx (B, T); with a KV cache, idx are the
        tokens at the cache's next T positions, and the cache advances by T. A cache says which
        positions those are (`rope`: their rows of the RoPE tables, (T, D/2), or (B, T, D/2) where each
        row has its own positions) and how attention reads it (`attend`); gpt/generation/cache.py's
        KVCache and the static cache's views do."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold integer token ids (int64), got {idx.dtype}")
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}; "
                                 f"crop the input to the last {self.config.block_size} tokens")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = cache.rope(self.rope_cos, self.rope_sin, T)
        self.kernels_in_use()  # KernelsUnavailable where 'triton' cannot run on this device
        op = self.ops
        x = self.drop(self.wte(idx))
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, op, use_reentrant=False)
            else:
                x = block(x, cos, sin, op, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.norm_f(x, op)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                z_loss: float = 0.0):
        """(logits (B, T, vocab), None) without targets; with targets, (logits, loss): the cross-entropy over
        targets != -1, their mean ("mean", the default), "sum", or per position ("none": (B, T), 0 where
        ignored). z_loss: each scored position's loss also gets z_loss * lse^2, lse = the logsumexp of its
        logits (PaLM's z-loss). With the fused head in use (`fused_loss_in_use`) the logits are never made
        and None is returned in their place, and a batch with every target ignored has mean loss 0 instead
        of NaN."""
        h = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(h), None
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        if self.fused_loss_in_use():
            loss = self.ops.linear_cross_entropy(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                                 ignore_index=-1, reduction=reduction, z_loss=z_loss)
            return None, (loss.view(targets.shape) if reduction == "none" else loss)
        logits = self.lm_head(h)
        flat, t = logits.float().view(-1, logits.size(-1)), targets.reshape(-1)  # (B*T, vocab), (B*T,)
        if not z_loss:
            loss = F.cross_entropy(flat, t, ignore_index=-1, reduction=reduction)
        else:
            valid = t != -1
            losses = F.cross_entropy(flat, t, ignore_index=-1, reduction="none") + \
                torch.where(valid, z_loss * torch.logsumexp(flat, dim=-1).square(), 0.0)
            loss = losses if reduction == "none" else losses.sum() if reduction == "sum" else \
                losses.sum() / valid.sum()
        return logits, (loss.view(targets.shape) if reduction == "none" else loss)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
                 dtype: torch.dtype | str | None = None, *, min_p: float | None = None,
                 repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 eot_id: int | None = None, compile: bool = False) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens). See gpt/generation/.

        temperature 0 is greedy; top_k, top_p, min_p filter; repetition_penalty (CTRL: over the prompt and
        the generated tokens), frequency_penalty and presence_penalty (OpenAI: over the generated tokens
        only). eot_id: a row ends when it samples this token and is padded with it from then on; the
        result is shorter once every row has ended. Stop strings, several samples per prompt and prompts
        of different lengths: `gpt.generation.generate_completions`. compile: compiled static-shape
        decoding (gpt/generation/compiled.py): the same tokens up to rounding, faster after a one-time
        compilation.
        """
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        generator=generator, use_cache=use_cache, dtype=dtype, min_p=min_p,
                        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                        presence_penalty=presence_penalty, eot_id=eot_id, compile=compile)


def create_model(preset: str = "tiny", kernels: str = "auto", gradient_checkpointing: bool = False,
                 fused_loss: str = "auto", **overrides) -> GPT:
    """A freshly initialised GPT of the named preset (tiny/small/medium/large), GPTConfig fields overridden;
    `kernels`, `gradient_checkpointing` and `fused_loss` as in `GPT`."""
    return GPT(preset_config(preset, **overrides), kernels=kernels, gradient_checkpointing=gradient_checkpointing,
               fused_loss=fused_loss)
