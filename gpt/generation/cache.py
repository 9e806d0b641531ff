"""The KV caches: the eager decoder's growing one and the compiled decoder's static one.

`KVCache` (the eager `Decoder`, gpt/generation/eager.py): keys and values of every layer, preallocated
at block_size positions; a forward writes its T new positions at `pos` and attends over the filled
prefix, so its shapes grow with every token. A finished row is dropped (`select_rows`).

`DecodeState` (the `CompiledDecoder`, gpt/generation/compiled.py): what the compiled functions update
in place, with shapes that never change between tokens: the KV cache is (B, n_kv_head, block_size,
head_dim) per layer (`LayerCache`), allocated once; `pos` is a device tensor that the step advances
itself (no host-to-device copy per token); the penalty state (tokens seen, tokens generated) has a row
per batch row, finished or not. The model sees it through a view (`GPT.hidden_states(cache=...)`):
`PrefillView` writes positions 0..T-1 of a padded prompt and attends causally (the padding comes after
every real position, and the cache rows it fills lie past `pos`, masked until real tokens overwrite
them); `StepView` writes position `pos` with index_copy_ and attends over the whole cache with the keys
past `pos` masked (`ops.decode_attention`; the Triton kernel reads only the valid keys). The compiled
step is specialized on the state's buffers themselves, so states are reused from one generation to the
next (`DecodeState.take`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn


class KVCache:
    """Keys and values of every layer, (n_layer, B, n_kv_head, max_len, head_dim) each, preallocated.

    Sized by the KV heads, so GQA with n_kv_head = n_head / g needs 1/g of MHA's memory.
    `pos` is how many positions are filled (the same for every row); layers write at pos, the model
    advances pos once per forward.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.pos = max_len, 0

    @classmethod
    def for_model(cls, model, batch: int, dtype=None) -> "KVCache":
        c = model.config
        p = model.wte.weight
        return cls(c.n_layer, batch, c.n_kv_head, c.block_size, c.head_dim, device=p.device, dtype=dtype or p.dtype)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at positions pos..pos+T-1; return the filled cache (B, Hkv, pos+T, D)."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the RoPE tables (block_size, D/2) for the next T positions."""
        end = self.pos + T
        if end > cos.shape[0]:
            raise ValueError(f"sequence of {end} tokens exceeds block_size={cos.shape[0]}; "
                             f"crop the input to the last {cos.shape[0]} tokens")
        return cos[self.pos:end], sin[self.pos:end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op) -> torch.Tensor:
        """Store the new k, v of `layer`, then causal attention of q over every filled position."""
        k, v = self.update(layer, k, v)
        return op.attention(q, k, v, causal=True)

    def advance(self, T: int) -> None:
        self.pos += T

    def reset(self) -> None:
        self.pos = 0

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows `index` (a 1-D index tensor), in that order; the memory of the others
        is released."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class LayerCache(nn.Module):
    """One layer's keys and values, (B, n_kv_head, block_size, head_dim) each. A tensor per layer, not
    one for all: a compiled in-place write into a view of a larger buffer makes AOTAutograd copy the
    whole buffer back at every step, a write into a whole input buffer is done in place."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class DecodeState(nn.Module):
    """What the compiled functions update in place, as buffers: the KV cache of every layer, the next
    position, and the penalty state (tokens seen, tokens generated).

    The compiled step is specialized on these buffers themselves (the frozen CPU step guards on their
    identity, a CUDA graph on their addresses), so a state is reused from one generation to the next
    (`DecodeState.take`) rather than allocated anew, which would compile the step again."""

    def __init__(self, model, batch: int, dtype: torch.dtype, seen: bool, counts: bool):
        super().__init__()
        c = model.config
        device = model.wte.weight.device
        shape = (batch, c.n_kv_head, c.block_size, c.head_dim)
        self.layers = nn.ModuleList(LayerCache(shape, dtype, device) for _ in range(c.n_layer))
        self.batch = batch
        self.owner = weakref.ref(model)
        self.in_use = False
        self.register_buffer("pos", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        vocab = (batch, c.vocab_size)
        self.register_buffer("seen", torch.zeros(vocab, dtype=torch.bool, device=device) if seen else None,
                             persistent=False)
        self.register_buffer("counts", torch.zeros(vocab, device=device) if counts else None, persistent=False)

    _pool: dict = {}
    POOL_SIZE = 4   # states kept for reuse (each holds a KV cache), the least recently used dropped first

    @classmethod
    def take(cls, model, batch: int, dtype: torch.dtype, seen: torch.Tensor | None, counts: bool) -> "DecodeState":
        """A state for this model, batch and dtype, reused if one is free (its old cache contents stay: they
        lie past `pos`, masked, until overwritten), set up for a new generation: `seen` copied in, the
        counts zeroed. Release it with `release()`."""
        key = (id(model), batch, dtype, seen is not None, counts)
        state = cls._pool.pop(key, None)
        # The same model object (not another that reuses its id), on the same device (it may have moved).
        if state is None or state.in_use or state.owner() is not model \
                or state.layers[0].k.device != model.wte.weight.device:
            state = cls(model, batch, dtype, seen is not None, counts)
        cls._pool[key] = state                       # most recently used last
        while len(cls._pool) > cls.POOL_SIZE:
            cls._pool.pop(next(iter(cls._pool)))
        if seen is not None:
            state.seen.copy_(seen)
        if counts:
            state.counts.zero_()
        state.in_use = True
        return state

    def release(self) -> None:
        self.in_use = False


class PrefillView:
    """The cache as `GPT.hidden_states` sees it in prefill: positions 0..T-1 (T static)."""

    def __init__(self, state: DecodeState):
        self.state = state

    def rope(self, cos, sin, T: int):
        return cos[:T], sin[:T]

    def attend(self, layer: int, q, k, v, op):
        cache, T = self.state.layers[layer], k.shape[2]
        cache.k[:, :, :T] = k
        cache.v[:, :, :T] = v
        return op.attention(q, k, v, causal=True)

    def advance(self, T: int) -> None:
        pass


class StepView:
    """The cache as `GPT.hidden_states` sees it in a one-token step: position state.pos."""

    def __init__(self, state: DecodeState):
        self.state = state
        self.kv_len = (state.pos + 1).repeat(state.batch)   # (B,) valid keys once this token is in, contiguous

    def rope(self, cos, sin, T: int):
        return cos.index_select(0, self.state.pos), sin.index_select(0, self.state.pos)

    def attend(self, layer: int, q, k, v, op):
        cache = self.state.layers[layer]
        cache.k.index_copy_(2, self.state.pos, k.to(cache.k.dtype))
        cache.v.index_copy_(2, self.state.pos, v.to(cache.v.dtype))
        return op.decode_attention(q, cache.k, cache.v, self.kv_len)

    def advance(self, T: int) -> None:
        pass


__all__ = ["KVCache", "LayerCache", "DecodeState", "PrefillView", "StepView"]
