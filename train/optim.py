"""Optimizers: AdamW, and Muon for the blocks' weight matrices with AdamW for everything else.

`make_optimizer(model, cfg, device)` builds the optimizer a TrainConfig asks for.

Muon (Keller Jordan et al., 2024; used by modded-nanogpt's speedruns and nanochat) takes the
momentum of a matrix's gradient and replaces it by the nearest semi-orthogonal matrix, U V^T of its
SVD, computed approximately with a few Newton-Schulz iterations. Every direction of the update then
moves by the same amount, so rare directions are not drowned by the dominant ones. It applies to
the 2-D weights inside the blocks; the embedding (tied to the output head here) and the norm gains
keep AdamW. One optimizer object holds both kinds of group, so GradScaler, checkpoints and the LR
schedule treat it like any other optimizer.

Across ranks (`shard_work=True`, DDP or FSDP): every rank forms the same momentum-corrected gradients
(FSDP: its shard, then an all-gather of the full matrix), orthogonalizes only its share of the
matrices of each shape, and an all-gather hands every rank the others' results, so the Newton-Schulz
work is split rather than repeated (as nanochat does). Each rank then applies the whole update (FSDP:
its rows of it). The update is the single-process one.
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict

import torch
import torch.distributed as dist

from gpt import GPT

from .config import TrainConfig

# Quintic Newton-Schulz coefficients from Keller Jordan's Muon: chosen so that the iteration pushes
# every singular value in (0, 1] into about [0.7, 1.2] within five steps (it does not converge to
# exactly 1; Muon does not need it to).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _is_dtensor(t) -> bool:
    """Whether t is one of FSDP's sharded DTensors. Their module is looked up, not imported: a DTensor exists only
    once it is imported (FSDP does), and importing it here added ~0.6 s to the start of every command that
    imports train (train, train.evaluate, the benchmarks' workers)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, by Newton-Schulz in bf16; g is a matrix or a stack of
    matrices (..., rows, cols), each orthogonalized on its own. Returns g's dtype.

    A step is three bf16 GEMMs (fp32 accumulation) with the scalar terms fused in by baddbmm:
    gram = x x^T, B = b gram + c gram gram, x = a x + B x, each rounded to bf16 once. Written as
    a*x + (b*gram + c*gram @ gram) @ x it rounds eight intermediates a step, lands about twice as far
    from fp64 Newton-Schulz, and takes ~20% longer on CPU (bench/muon_ns.py). Orthogonalizing
    stack[i:j] gives bit for bit rows i:j of orthogonalizing the stack, which the work split over
    ranks relies on (tests/train/test_optim.py checks both on CPU)."""
    a, b, c = NS_COEFFS
    rows, cols = g.shape[-2:]
    x = g.to(torch.bfloat16).reshape(math.prod(g.shape[:-2]), rows, cols)  # 3-D: a lone matrix is a batch of 1
    if rows > cols:  # iterate on the wide orientation: the Gram matrix x x^T is then the smaller one,
        x = x.mT.contiguous()  # row-major: the first step's GEMMs read a transposed view ~20% slower
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if rows > cols:
        x = x.mT
    return x.reshape(g.shape).to(g.dtype)


def _orthogonalize_shared(stack: torch.Tensor, steps: int) -> torch.Tensor:
    """orthogonalize(stack) with the matrices dealt out over the ranks: rank r takes the r-th run of
    ceil(n / world) of them, and an all-gather (one per shape) returns every rank the full result."""
    rank, world, n = dist.get_rank(), dist.get_world_size(), stack.size(0)
    per = -(-n // world)
    mine = stack[rank * per:(rank + 1) * per]
    out = stack.new_zeros((per, *stack.shape[1:]))  # padding where n does not divide evenly
    if len(mine):
        out[:len(mine)] = orthogonalize(mine, steps)
    parts = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(parts, out)
    return torch.cat(parts)[:n]


class MuonAdamW(torch.optim.Optimizer):
    """Muon on groups with ``muon=True``, AdamW on the rest.

    Muon group: momentum (Nesterov) on the gradient, then each row block named in ``splits`` of the
    parameter (the row sizes of the logical matrices packed in it, e.g. the q, k and v parts of the
    attention input projection; see GPT.block_matrices) is orthogonalized on its own and
    scaled by sqrt(max(1, rows / cols)), which makes the update's RMS entry 1/sqrt(cols) whatever
    the aspect ratio; decoupled weight decay ``lr * weight_decay``. AdamW group: the usual update with
    bias correction and decoupled weight decay.
    """

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, ns_steps: int = 5, shard_work: bool = False):
        """shard_work: split the Newton-Schulz work over the ranks of the default process group (every
        rank must then call step() together, as DDP and FSDP training do)."""
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps, weight_decay=0.0,
                        muon=False, splits=None)
        super().__init__(groups, defaults)
        self.shard_work = shard_work

    def load_state_dict(self, state_dict: dict) -> None:
        # The splits describe the model's packed matrices, not optimizer state: keep this model's (a
        # checkpoint of an older version wrote None for matrices that pack one part).
        splits = [group["splits"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, s in zip(self.param_groups, splits):
            group["splits"] = s

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        params, by_shape = [], defaultdict(list)  # matrices of one shape are orthogonalized in one batch
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            g = p.grad.lerp(buf, mu)  # Nesterov: look one momentum step ahead
            if _is_dtensor(g):  # FSDP: this rank holds some rows; Newton-Schulz needs the matrix
                g = g.full_tensor()
            row = 0
            for part in g.split(group["splits"][i]):
                by_shape[part.shape].append((len(params), row, part))
                row += part.size(0)
            params.append(p)
        updates = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]  # full size
        for (rows, cols), pieces in by_shape.items():
            stack = torch.stack([part for _, _, part in pieces])
            if self.shard_work and dist.is_initialized() and dist.get_world_size() > 1:
                ortho = _orthogonalize_shared(stack, group["ns_steps"])
            else:
                ortho = orthogonalize(stack, group["ns_steps"])
            ortho *= max(1.0, rows / cols) ** 0.5
            for (k, row, _), u in zip(pieces, ortho):
                updates[k][row:row + rows] = u
        for p, u in zip(params, updates):
            if _is_dtensor(p):  # this rank's rows of the update, cut locally (no communication)
                from torch.distributed.tensor import distribute_tensor
                u = distribute_tensor(u, p.device_mesh, p.placements, src_data_rank=None)
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(u, alpha=-lr)

    def _adamw(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0  # a Python int: no device sync to read it
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            if wd:
                p.mul_(1 - lr * wd)
            denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


def muon_groups(model: GPT, matrix_lr: float, adam_lr: float, weight_decay: float) -> list[dict]:
    """Muon for the blocks' projection matrices (split into the logical matrices the model says they
    pack: q | k | v, gate | up); AdamW for the embedding/head and the norm gains (and biases), weight
    decay on matrices only."""
    matrices, splits = map(list, zip(*model.block_matrices()))
    taken = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in taken and p.requires_grad]
    return [
        {"params": matrices, "muon": True, "splits": splits, "lr": matrix_lr, "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() >= 2], "lr": adam_lr, "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "lr": adam_lr, "weight_decay": 0.0},
    ]


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device, distributed: bool = False,
                   sharded: bool = False) -> torch.optim.Optimizer:
    """cfg.optimizer "adamw": AdamW, weight decay on matrices (>= 2-D) only, fused kernels on CUDA
    (foreach for FSDP's sharded parameters and off CUDA). "muon": Muon for the blocks' matrices at
    cfg.matrix_lr, AdamW at cfg.lr for the rest, its Newton-Schulz work split across ranks when
    `distributed`. Each group starts at its peak rate; the schedule scales that."""
    if cfg.optimizer == "muon":
        groups = muon_groups(model, cfg.matrix_lr, cfg.lr, cfg.weight_decay)
        return MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), momentum=cfg.momentum,
                         shard_work=distributed)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" and not sharded else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)
