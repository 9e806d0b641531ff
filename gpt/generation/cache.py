"""The KV caches: the eager decoder's growing one and the compiled decoder's static one.

`KVCache` (the eager `Decoder`, gpt/generation/eager.py): keys and values of every layer, preallocated
at block_size positions, and a length per row; a forward writes each row's T new positions at that row's
length and attends over its filled prefix, so its shapes grow with every token. Prompts of different
lengths are prefilled right-padded (`KVCache.prefill`); rows of one length take the single-position path
(slices, no mask), rows of different lengths the masked `ops.decode_attention` with kv_len per row. A
finished row is dropped (`select_rows`); the engine (gpt/generation/engine.py) keeps its slots and holds
the free ones (`hold`).

`DecodeState` (the `CompiledDecoder`, gpt/generation/compiled.py, and the compiled engine): what the
compiled functions update in place, with shapes that never change between tokens: a fixed number of
slots; the KV cache is (slots, n_kv_head, block_size + 1, head_dim) per layer (`LayerCache`, the last
position a scratch one), allocated once; `pos` (slots,) is each slot's length, a device tensor that the
step advances itself (no host-to-device copy per token); the penalty state (tokens seen, tokens
generated) has a row per slot. The model sees it through a view (`GPT.hidden_states(cache=...)`):
`PrefillView` writes positions 0..T-1 of right-padded prompts into every slot or into chosen slots and
attends causally (the padding comes after every real position, and the cache rows it fills lie past the
slot's length, masked until real tokens overwrite them); `StepView` writes each slot's token at its own
position and attends over the whole cache with each slot's keys past its length masked
(`ops.decode_attention` with kv_len per slot; the Triton kernel reads only the valid keys); a slot that
does not decode in a step (free, just prefilled) writes to the scratch position and attends to nothing.
The compiled step is specialized on the state's buffers themselves, so states are reused from one
generation to the next (`DecodeState.take`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn


class KVCache:
    """Keys and values of every layer, (n_layer, B, n_kv_head, max_len, head_dim) each, preallocated, and
    how many positions of each row are filled (`lengths`, host-side ints: no device sync to read them).

    Sized by the KV heads, so GQA with n_kv_head = n_head / g needs 1/g of MHA's memory.

    A forward through the cache itself (`GPT.hidden_states(idx, cache=cache)`, idx (live, T)) puts T new
    tokens of each of the first `live` rows at that row's own length, at RoPE positions lengths[b]..
    lengths[b] + T - 1, and each query attends to its row's filled keys up to its own position. When
    every row has one length (and none is held) that is today's single-position path: a slice of the RoPE
    tables, a slice write and causal attention over the filled prefix, no mask. Otherwise the tables are
    gathered per row, the writes scattered, and attention is `ops.decode_attention` with kv_len per row
    (FlashAttention's cache_seqlens), so keys past a row's length (padding, another row's longer
    history) are never attended.

    `prefill(rows, lengths)` is the view a prompt forward goes through: the rows' prompts, right-padded
    to one length T, written at positions 0..T-1 of those rows, with plain causal attention: from an
    empty row, a real token never sees the padding that follows it, so no mask is needed, and the row's
    length becomes its real length (the padding's keys lie past it, never attended, overwritten by the
    next tokens). `hold(rows)`: in the next forward those rows' tokens are placeholders (a row that was
    just prefilled while the others decode): their keys go to a scratch position past max_len, they
    attend to nothing and their length stays. `pos` is the shared length (assigning it sets every row's).
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (n_layer, batch, n_kv_head, max_len + 1, head_dim)   # + 1: the scratch position of held rows
        self._k = torch.zeros(shape, device=device, dtype=dtype)
        self._v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * batch
        self.live = batch            # forwards through the cache run over rows 0..live-1
        self._held: set[int] = set()
        self._rows = None            # this forward's per-row plan (write positions, kv_len, keys read); None: shared

    @classmethod
    def for_model(cls, model, batch: int, dtype=None) -> "KVCache":
        c = model.config
        p = model.wte.weight
        return cls(c.n_layer, batch, c.n_kv_head, c.block_size, c.head_dim, device=p.device, dtype=dtype or p.dtype)

    @property
    def k(self) -> torch.Tensor:
        return self._k[..., :self.max_len, :]

    @property
    def v(self) -> torch.Tensor:
        return self._v[..., :self.max_len, :]

    @property
    def batch(self) -> int:
        return self._k.shape[1]

    @property
    def pos(self) -> int:
        """The length of every row, when they share one."""
        lengths = set(self.lengths[:self.live])
        if len(lengths) != 1:
            raise ValueError(f"the rows of this cache have different lengths {self.lengths[:self.live]}; "
                             f"read cache.lengths")
        return lengths.pop()

    @pos.setter
    def pos(self, value: int) -> None:
        self.lengths = [int(value)] * self.batch

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (live, Hkv, T, D) at positions pos..pos+T-1 of rows that share one length; return the
        filled cache (live, Hkv, pos+T, D)."""
        pos, T, n = self.pos, k.shape[2], k.shape[0]
        end = pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self._k[layer, :n, :, pos:end] = k
        self._v[layer, :n, :, pos:end] = v
        return self._k[layer, :n, :, :end], self._v[layer, :n, :, :end]

    def hold(self, rows) -> None:
        """In the next forward, the tokens of these rows are placeholders (one token each): not stored, not
        counted, their outputs meaningless."""
        self._held = set(int(r) for r in rows)

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the RoPE tables (block_size, D/2) for the next T positions: (T, D/2) when the rows
        share a length, else (live, T, D/2), each row at its own positions. GPT.hidden_states calls it first
        in a forward, so it also fixes where this forward writes and what it attends to."""
        lengths, held = self.lengths[:self.live], self._held
        if held and T != 1:
            raise ValueError(f"held rows take one placeholder token; this forward has {T}")
        end = max((n for b, n in enumerate(lengths) if b not in held), default=0) + T
        if end > cos.shape[0]:
            raise ValueError(f"sequence of {end} tokens exceeds block_size={cos.shape[0]}; "
                             f"crop the input to the last {cos.shape[0]} tokens")
        if not held and min(lengths) == max(lengths):
            self._rows = None
            return cos[lengths[0]:lengths[0] + T], sin[lengths[0]:lengths[0] + T]
        device = self._k.device
        start = torch.tensor([min(n, cos.shape[0] - T) for n in lengths], device=device)
        positions = start[:, None] + torch.arange(T, device=device)                       # (live, T)
        held_rows = torch.tensor([b in held for b in range(self.live)], device=device)
        write = positions.masked_fill(held_rows[:, None], self.max_len)                     # held: the scratch
        kv_len = torch.tensor([0 if b in held else n + T for b, n in enumerate(lengths)], device=device)
        self._rows = (write, kv_len, end)
        return cos[positions], sin[positions]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op) -> torch.Tensor:
        """Store the new k, v of `layer`, then causal attention of q over each row's filled positions."""
        if self._rows is None:
            k, v = self.update(layer, k, v)
            return op.attention(q, k, v, causal=True)
        write, kv_len, end = self._rows
        n = q.shape[0]
        rows = torch.arange(n, device=write.device)[:, None]
        self._k[layer][rows, :, write] = k.transpose(1, 2).to(self._k.dtype)        # (live, T, Hkv, D)
        self._v[layer][rows, :, write] = v.transpose(1, 2).to(self._v.dtype)
        return op.decode_attention(q, self._k[layer, :n, :, :end], self._v[layer, :n, :, :end], kv_len)

    def advance(self, T: int) -> None:
        for b in range(self.live):
            if b not in self._held:
                self.lengths[b] += T
        self._held, self._rows = set(), None

    def reset(self) -> None:
        self.lengths = [0] * self.batch
        self._held, self._rows = set(), None

    def prefill(self, rows: list[int] | None, lengths: list[int]) -> "CachePrefill":
        """The view a prompt forward goes through: the prompts of `rows` (None: rows 0..len(lengths)-1),
        right-padded, from position 0; afterwards row rows[i] holds lengths[i] positions."""
        return CachePrefill(self, rows, lengths)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows `index` (a 1-D index tensor), in that order; the memory of the others
        is released."""
        self._k = self._k.index_select(1, index)
        self._v = self._v.index_select(1, index)
        self.lengths = [self.lengths[i] for i in index.tolist()]
        self.live = len(self.lengths)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class CachePrefill:
    """A KVCache as a prompt forward sees it (`KVCache.prefill`): the rows' right-padded prompts at positions
    0..T-1, plain causal attention over the new keys (no mask: the padding comes after every real token of
    its row), then each row's length is its real length."""

    def __init__(self, cache: KVCache, rows: list[int] | None, lengths: list[int]):
        self.cache, self.lengths = cache, [int(n) for n in lengths]
        self.rows = list(range(len(self.lengths))) if rows is None else [int(r) for r in rows]
        in_order = self.rows == list(range(len(self.rows)))
        self.index = None if in_order else torch.tensor(self.rows, device=cache._k.device)

    def rope(self, cos, sin, T: int):
        if T > min(cos.shape[0], self.cache.max_len):
            raise ValueError(f"sequence of {T} tokens exceeds block_size={cos.shape[0]}; "
                             f"crop the input to the last {cos.shape[0]} tokens")
        return cos[:T], sin[:T]

    def attend(self, layer: int, q, k, v, op):
        c, T = self.cache, k.shape[2]
        if self.index is None:
            c._k[layer, :k.shape[0], :, :T] = k
            c._v[layer, :k.shape[0], :, :T] = v
        else:
            c._k[layer][self.index, :, :T] = k.to(c._k.dtype)
            c._v[layer][self.index, :, :T] = v.to(c._v.dtype)
        return op.attention(q, k, v, causal=True)

    def advance(self, T: int) -> None:
        for r, n in zip(self.rows, self.lengths):
            self.cache.lengths[r] = n


class LayerCache(nn.Module):
    """One layer's keys and values, (B, n_kv_head, block_size + 1, head_dim) each: block_size positions and
    a scratch position, where the step writes the placeholder tokens of slots that do not decode. A tensor
    per layer, not one for all: a compiled in-place write into a view of a larger buffer makes AOTAutograd
    copy the whole buffer back at every step, a write into a whole input buffer is done in place."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class DecodeState(nn.Module):
    """What the compiled functions update in place, as buffers: the KV cache of every layer, each slot's
    length (`pos`, (B,)), and the penalty state (tokens seen, tokens generated).

    The compiled step is specialized on these buffers themselves (the frozen CPU step guards on their
    identity, a CUDA graph on their addresses), so a state is reused from one generation to the next
    (`DecodeState.take`) rather than allocated anew, which would compile the step again."""

    def __init__(self, model, batch: int, dtype: torch.dtype, seen: bool, counts: bool):
        super().__init__()
        c = model.config
        device = model.wte.weight.device
        shape = (batch, c.n_kv_head, c.block_size + 1, c.head_dim)
        self.layers = nn.ModuleList(LayerCache(shape, dtype, device) for _ in range(c.n_layer))
        self.batch, self.block_size = batch, c.block_size
        self.owner = weakref.ref(model)
        self.in_use = False
        self.register_buffer("pos", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        vocab = (batch, c.vocab_size)
        self.register_buffer("seen", torch.zeros(vocab, dtype=torch.bool, device=device) if seen else None,
                             persistent=False)
        self.register_buffer("counts", torch.zeros(vocab, device=device) if counts else None, persistent=False)

    _pool: dict = {}
    POOL_SIZE = 4   # states kept for reuse (each holds a KV cache), the least recently used dropped first

    @classmethod
    def take(cls, model, batch: int, dtype: torch.dtype, seen: torch.Tensor | None, counts: bool) -> "DecodeState":
        """A state for this model, batch and dtype, reused if one is free (its old cache contents stay: they
        lie past each slot's length, masked, until overwritten), set up for a new generation: `seen` copied
        in, the counts zeroed. Release it with `release()`."""
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
    """The cache as `GPT.hidden_states` sees it in prefill: prompts right-padded to T (static) at positions
    0..T-1 of every slot (rows None: the tokens' rows are the slots) or of the slots `rows` ((m,) tensor),
    plain causal attention over the new keys (the padding comes after every real token of its row)."""

    def __init__(self, state: DecodeState, rows: torch.Tensor | None = None):
        self.state, self.rows = state, rows

    def rope(self, cos, sin, T: int):
        return cos[:T], sin[:T]

    def attend(self, layer: int, q, k, v, op):
        cache, T = self.state.layers[layer], k.shape[2]
        if self.rows is None:
            cache.k[:, :, :T] = k
            cache.v[:, :, :T] = v
        else:
            heads = torch.arange(k.shape[1], device=k.device)[None, :, None]
            index = (self.rows[:, None, None], heads, torch.arange(T, device=k.device)[None, None, :])
            cache.k.index_put_(index, k.to(cache.k.dtype))
            cache.v.index_put_(index, v.to(cache.v.dtype))
        return op.attention(q, k, v, causal=True)

    def advance(self, T: int) -> None:
        pass


class StepView:
    """The cache as `GPT.hidden_states` sees it in a one-token step: each slot at its own position
    state.pos[b]; slots where `active` is False (free, just prefilled, finished) write their placeholder
    token to the scratch position and attend to nothing."""

    def __init__(self, state: DecodeState, active: torch.Tensor):
        self.state = state
        pos = state.pos
        self.write = torch.where(active, pos, state.block_size)        # (B,)
        self.kv_len = torch.where(active, pos + 1, 0)                  # (B,) valid keys once this token is in
        self.rows = torch.arange(state.batch, device=pos.device)

    def rope(self, cos, sin, T: int):
        p = self.state.pos.clamp(max=cos.shape[0] - 1)
        return cos.index_select(0, p)[:, None], sin.index_select(0, p)[:, None]   # (B, 1, D/2): per slot

    def attend(self, layer: int, q, k, v, op):
        cache = self.state.layers[layer]
        cache.k[self.rows, :, self.write] = k[:, :, 0].to(cache.k.dtype)     # (B, Hkv, D) at each slot's position
        cache.v[self.rows, :, self.write] = v[:, :, 0].to(cache.v.dtype)
        return op.decode_attention(q, cache.k, cache.v, self.kv_len)

    def advance(self, T: int) -> None:
        pass


__all__ = ["KVCache", "CachePrefill", "LayerCache", "DecodeState", "PrefillView", "StepView"]
