"""Causal grouped-query flash attention (FlashAttention-2) in Triton: forward, backward, split-KV decode.

Layers (as every kernel module, docs/architecture.md): `@triton.jit` kernels -> launchers (`attention_fwd`, `attention_bwd`: validate, allocate,
pick the block config) -> `torch.library` custom ops `tritongpt::attention_fwd` / `attention_bwd` with fake
and autograd registrations (so `torch.compile(fullgraph=True)` traces through them) -> `attention` and
`attention_with_lse`. `decode_attention` (op `tritongpt::decode_attention`, inference only) runs the split-KV
decode kernel over a preallocated cache with per-row lengths read on the device (CUDA-graph capturable).

Shapes: q (B, H, Tq, D), k/v (B, Hkv, Tk, D), H % Hkv == 0; query head h reads K/V head h // (H // Hkv).
Causal masking is end-aligned: query i sees keys j <= Tk - Tq + i (KV-cache prefill and decode).
The kernels save the log-sum-exp per query row in base 2, lse2 = log2 sum_j 2^(s_ij scale log2(e)) =
lse / ln(2), (B, H, Tq) fp32: the backward recomputes P = exp2(s scale log2(e) - lse2) from exactly the
numbers the forward used (a natural-log round trip costs ~1e-7 relative in P, visible in fp32 tests).
`attention_with_lse` returns the natural-log value. A row that sees no key (only possible when Tq > Tk)
has output 0 and log-sum-exp -inf, like `kernels.reference`.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._runtime import (TORCH_TO_TL_NAME, CompileSpec, check_tensor, dtype_name, interpreting, signature, sm_count,
                       triton_compat, unit_last_stride)

triton_compat()

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
# Globals read inside @triton.jit functions must be constexpr.
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _load_rows(ptrs, rows, n_rows, d_mask, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; out-of-range rows and padded head-dim columns read as 0."""
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & d_mask[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    return x


@triton.jit
def _query_block_program(H, GROUP, Tq, BLOCK_M: tl.constexpr):
    """b, h, hkv (int64), row0 (the head's first LSE / DELTA row), start_m, offs_m of a (query block, b*h) program."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # Index arithmetic in int32 (int64 division is a subroutine call with a stack frame), offsets in int64.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hkv = (pid_bh % H // GROUP).to(tl.int64)
    row0 = pid_bh.to(tl.int64) * Tq
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    return b, h, hkv, row0, start_m, offs_m


@triton.jit
def _query_block_key_bounds(start_m, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(Tk - Tq, unmasked_hi, masked_hi): block start_m reads keys unmasked to unmasked_hi, masked to masked_hi."""
    causal_offset = Tk - Tq
    n_full_blocks_end = Tk // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        # Keys <= start_m + offset are visible to every row of the block: unmasked up to that block edge.
        unmasked_hi = tl.minimum(tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N * BLOCK_N,
                                 n_full_blocks_end)
        masked_hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), Tk)
    else:
        unmasked_hi = n_full_blocks_end
        masked_hi = Tk
    return causal_offset, unmasked_hi, masked_hi


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, q_pos, k_base, v_base, stride_kt, stride_vt, lo, hi, Tk, causal_offset,
                    qk_scale, offs_n, offs_d, d_mask,
                    BLOCK_N: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                    UPCAST: tl.constexpr):
    """Online softmax over key blocks [lo, hi): s = q k^T * scale * log2(e), m = running max, l = running sum.

    MASK=False is the hot loop (every key of the block is visible to every row, no bounds checks);
    MASK=True handles the diagonal block(s) and the key tail.
    """
    DTYPE = k_base.dtype.element_ty
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base + cols[:, None] * stride_kt + offs_d[None, :], cols, Tk, d_mask, MASK, EVEN_D)
        v = _load_rows(v_base + cols[:, None] * stride_vt + offs_d[None, :], cols, Tk, d_mask, MASK, EVEN_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK:
            keep = cols[None, :] < Tk
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= q_pos[:, None] + causal_offset)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASK:
            # A row with no visible key so far has m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            # m_i itself keeps -inf so a later visible key sets the true max (P would underflow otherwise).
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p_lo = p.to(DTYPE)
        if UPCAST:
            p_lo = p_lo.to(tl.float32)
        acc = tl.dot(p_lo, v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    H, GROUP, Tq, Tk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):
    """O = softmax(Q K^T * scale [+ causal mask]) V for one (query block, batch*head); LSE = base-2
    log-sum-exp per row."""
    b, h, hkv, row0, start_m, offs_m = _query_block_program(H, GROUP, Tq, BLOCK_M)
    qk_scale = tl.cast(qk_scale, tl.float32)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    q = _load_rows(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                   offs_m, Tq, d_mask, True, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_offset, unmasked_hi, masked_hi = _query_block_key_bounds(start_m, Tq, Tk, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kt, stride_vt,
                                    0, unmasked_hi, Tk, causal_offset, qk_scale, offs_n, offs_d, d_mask,
                                    BLOCK_N, False, IS_CAUSAL, EVEN_D, UPCAST)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kt, stride_vt,
                                    unmasked_hi, masked_hi, Tk, causal_offset, qk_scale, offs_n, offs_d, d_mask,
                                    BLOCK_N, True, IS_CAUSAL, EVEN_D, UPCAST)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    row_ok = offs_m < Tq
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    lse = m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))  # -inf for a row that sees no key
    tl.store(LSE + row0 + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_decode_kernel(
    Q, K, V, O, LSE, KV_LEN,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_os, stride_ob, stride_oh, stride_ot, stride_ls, stride_lb, stride_lh,
    Hkv, GROUP, Tq, Tk, keys_per_split, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, HAS_KV_LEN: tl.constexpr,
):
    """Split-KV (flash-decoding) forward for few queries: one program per (key split, batch*kv head).

    The rows of the program are the GROUP query heads x Tq positions that share the KV head (row r is
    position r // GROUP of head hkv*GROUP + r % GROUP), so each K/V byte is read once per group. Writes the
    split's normalized output and its log-sum-exp; `_attn_combine_kernel` merges the splits.
    HAS_KV_LEN: K/V are a cache of Tk slots of which batch row b uses the first KV_LEN[b] (clamped to
    [0, Tk]), read here on the device; a split wholly past it reads nothing (output 0, lse -inf).
    """
    pid_s = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // Hkv).to(tl.int64)
    hkv = (pid_bkv % Hkv).to(tl.int64)
    if HAS_KV_LEN:
        Tk = tl.minimum(tl.maximum(tl.load(KV_LEN + b), 0), Tk).to(tl.int32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    rows = tl.arange(0, BLOCK_M)
    t = rows // GROUP
    h = hkv * GROUP + rows % GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    q = _load_rows(Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                   t, Tq, d_mask, True, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Tk)
    causal_offset = Tk - Tq
    if IS_CAUSAL:
        unmasked_hi = tl.maximum(causal_offset + 1, 0) // BLOCK_N * BLOCK_N  # position 0 sees keys <= offset
    else:
        unmasked_hi = Tk
    unmasked_hi = tl.maximum(tl.minimum(tl.minimum(unmasked_hi, Tk // BLOCK_N * BLOCK_N), hi), lo)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, t, k_base, v_base, stride_kt, stride_vt,
                                    lo, unmasked_hi, Tk, causal_offset, qk_scale, offs_n, offs_d, d_mask,
                                    BLOCK_N, False, IS_CAUSAL, EVEN_D, UPCAST)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, t, k_base, v_base, stride_kt, stride_vt,
                                    unmasked_hi, hi, Tk, causal_offset, qk_scale, offs_n, offs_d, d_mask,
                                    BLOCK_N, True, IS_CAUSAL, EVEN_D, UPCAST)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    row_ok = t < Tq
    tl.store(O + pid_s * stride_os + b * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_ot
             + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    lse = m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))
    tl.store(LSE + pid_s * stride_ls + b * stride_lb + h * stride_lh + t, lse, mask=row_ok)


@triton.jit
def _attn_combine_kernel(
    O_PART, LSE_PART, O, LSE,
    stride_ob, stride_oh, stride_ot,
    H, Tq, n_rows, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Merge split-KV partials (base-2 log-sum-exps): lse = log2 sum_s 2^lse_s; o = sum_s 2^(lse_s - lse) o_s.

    Partials are contiguous fp32, O_PART (n_splits, n_rows, HEAD_DIM) and LSE_PART (n_splits, n_rows),
    with rows flattened as (b, h, t).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

    lse_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(n_splits):
        lse_max = tl.maximum(lse_max, tl.load(LSE_PART + s * n_rows + rows, mask=row_ok, other=float("-inf")))
    # Rows that see no key in any split: subtract 0 so the weights are exp2(-inf) = 0; their lse stays -inf.
    m = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(n_splits):
        w = tl.math.exp2(tl.load(LSE_PART + s * n_rows + rows, mask=row_ok, other=float("-inf")) - m)
        o_s = tl.load(O_PART + (s * n_rows + rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        w_sum += w
        acc += w[:, None] * o_s

    o = acc / tl.where(w_sum == 0.0, 1.0, w_sum)[:, None]
    t = rows % Tq
    bh = rows // Tq
    o_ptrs = O + (bh // H).to(tl.int64) * stride_ob + (bh % H).to(tl.int64) * stride_oh + t * stride_ot
    tl.store(o_ptrs[:, None] + offs_d[None, :], o.to(O.dtype.element_ty), mask=mask)
    lse = tl.where(w_sum == 0.0, float("-inf"), m + tl.math.log2(tl.where(w_sum == 0.0, 1.0, w_sum)))
    tl.store(LSE + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, minus dlse when the log-sum-exp output has a gradient: d lse / d s = P,
    so it folds into dS = P (dP - delta). DLSE is the gradient of the base-2 lse2, so dlse = DLSE * log2(e)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row0 = pid_bh.to(tl.int64) * Tq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + row0 + offs_m, mask=offs_m < Tq, other=0.0) * _LOG2E
    tl.store(DELTA + row0 + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                         lo, hi, Tq, causal_offset, qk_scale, cols, offs_m, offs_d, d_mask,
                         BLOCK_M: tl.constexpr, MASK: tl.constexpr, EVEN_D: tl.constexpr,
                         UPCAST: tl.constexpr):
    """Accumulate dV += P^T dO and dK += dS^T Q over query blocks [lo, hi) of one query head,
    recomputing P^T = exp2(K Q^T * scale * log2(e) - lse2) from the saved base-2 log-sum-exp.

    Only the causal diagonal needs MASK. Query rows past Tq load q = dO = lse = delta = 0, so they add
    exactly 0 to dK and dV; key rows past Tk produce rows of dK/dV that are never stored.
    """
    DTYPE = q_base.dtype.element_ty
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(q_base + rows[:, None] * stride_qt + offs_d[None, :], rows, Tq, d_mask, True, EVEN_D)
        do = _load_rows(do_base + rows[:, None] * stride_dot + offs_d[None, :], rows, Tq, d_mask, True, EVEN_D)
        lse = tl.load(lse_base + rows, mask=rows < Tq, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < Tq, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASK:
            # tl.where, not a multiply: a row that sees no key has lse = -inf and exp2 gives inf there.
            p_t = tl.where(cols[:, None] <= rows[None, :] + causal_offset, p_t, 0.0)
        p_lo = p_t.to(DTYPE)
        if UPCAST:
            p_lo = p_lo.to(tl.float32)
        dv = tl.dot(p_lo, do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(DTYPE)
        if UPCAST:
            ds_t = ds_t.to(tl.float32)
        dk = tl.dot(ds_t, q, dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    Hkv, GROUP, Tq, Tk, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):
    """dK, dV for one (key block, batch*kv head), looping over the GROUP query heads sharing it:
    dV = sum_h P_h^T dO_h, dK = scale * sum_h dS_h^T Q_h. fp32 accumulators, one store, no atomics."""
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // Hkv).to(tl.int64)
    hkv = (pid_bkv % Hkv).to(tl.int64)
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    k = _load_rows(K + b * stride_kb + hkv * stride_kh + cols[:, None] * stride_kt + offs_d[None, :],
                   cols, Tk, d_mask, True, EVEN_D)
    v = _load_rows(V + b * stride_vb + hkv * stride_vh + cols[:, None] * stride_vt + offs_d[None, :],
                   cols, Tk, d_mask, True, EVEN_D)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    causal_offset = Tk - Tq
    if IS_CAUSAL:
        # Query blocks [lo, diag_hi) cross the diagonal of this key block (masked); later ones see all of it.
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M  # first row that sees one of these keys
        diag_hi = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(diag_hi, tl.cdiv(Tq, BLOCK_M) * BLOCK_M)
    else:
        diag_hi = 0

    for g in range(GROUP):
        h = hkv * GROUP + g
        bh = b * Hkv * GROUP + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * Tq
        delta_base = DELTA + bh * Tq
        if IS_CAUSAL:
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                          stride_dot, lo, diag_hi, Tq, causal_offset, qk_scale, cols, offs_m,
                                          offs_d, d_mask, BLOCK_M, True, EVEN_D, UPCAST)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                      diag_hi, Tq, Tq, causal_offset, qk_scale, cols, offs_m, offs_d, d_mask,
                                      BLOCK_M, False, EVEN_D, UPCAST)

    mask = (cols < Tk)[:, None] & d_mask[None, :]
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + cols[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, q_pos, k_base, v_base, stride_kt, stride_vt, lo, hi, Tk,
                       causal_offset, qk_scale, offs_n, offs_d, d_mask,
                       BLOCK_N: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                       UPCAST: tl.constexpr):
    """Accumulate dQ += dS K over key blocks [lo, hi), with dS = P (dP - delta), dP = dO V^T."""
    DTYPE = k_base.dtype.element_ty
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base + cols[:, None] * stride_kt + offs_d[None, :], cols, Tk, d_mask, MASK, EVEN_D)
        v = _load_rows(v_base + cols[:, None] * stride_vt + offs_d[None, :], cols, Tk, d_mask, MASK, EVEN_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            keep = cols[None, :] < Tk
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= q_pos[:, None] + causal_offset)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(DTYPE)
        if UPCAST:
            ds = ds.to(tl.float32)
        dq = tl.dot(ds, k, dq)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    H, GROUP, Tq, Tk, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):
    """dQ = scale * sum_j dS_ij K_j for one (query block, batch*head); same block schedule as the forward."""
    b, h, hkv, row0, start_m, offs_m = _query_block_program(H, GROUP, Tq, BLOCK_M)
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_ok = offs_m < Tq

    q = _load_rows(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                   offs_m, Tq, d_mask, True, EVEN_D)
    do = _load_rows(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                    offs_m, Tq, d_mask, True, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + row0 + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row0 + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_offset, unmasked_hi, masked_hi = _query_block_key_bounds(start_m, Tq, Tk, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kt, stride_vt, 0, unmasked_hi,
                            Tk, causal_offset, qk_scale, offs_n, offs_d, d_mask,
                            BLOCK_N, False, IS_CAUSAL, EVEN_D, UPCAST)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kt, stride_vt, unmasked_hi,
                            masked_hi, Tk, causal_offset, qk_scale, offs_n, offs_d, d_mask,
                            BLOCK_N, True, IS_CAUSAL, EVEN_D, UPCAST)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------

class Config(NamedTuple):
    """Block sizes and launch options of one kernel launch."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Block configs per padded head dim (BLOCK_D), for fp16/bf16 (fp32 runs only in the interpreter: with FMA
# dots instead of tensor cores every tile tried at head_dim >= 80 spilled). One table serves sm_80 and
# sm_90, and the 99 KB-shared-memory consumer parts (every entry needs <= 96 KB on sm_80).
# `python -m kernels.report` compiles each entry for both targets. Each is the first of a preference-ordered
# candidate list (larger tiles first) that compiles without spills for every variant the launcher can pick
# (fp16/bf16, causal or not, head dims 80/96 on the 128 block). Hopper-only tiles (forward 128x128 at
# D=128: 160-224 KB, 251 registers) were left out: without a GPU to time them they would be an untested branch.
FWD_CONFIGS = {16: Config(128, 128, 8, 3), 32: Config(128, 128, 8, 3), 64: Config(128, 128, 8, 3),
               128: Config(128, 64, 8, 3)}
# dK/dV program: block_n keys owned by the program, block_m query rows per step.
BWD_DKDV_CONFIGS = {16: Config(32, 128, 8, 2), 32: Config(32, 128, 8, 2), 64: Config(32, 128, 8, 2),
                    128: Config(32, 64, 8, 2)}
BWD_DQ_CONFIGS = {16: Config(128, 32, 8, 2), 32: Config(128, 32, 8, 2), 64: Config(128, 32, 8, 2),
                  128: Config(128, 32, 8, 2)}
# Split-KV decode, per (BLOCK_D, block_m): block_m = (H // Hkv) * Tq packed rows rounded up to 16/32/64.
# At BLOCK_D=128 the regular choice (block_n 64, 4 warps, 3 stages) spills a register in some variants.
# Three entries have fewer stages so that they are spill-free with the oldest supported Triton (3.6, ptxas
# 12.8) as well as the current one: with Triton 3.6, 3 stages spilled 8 B at (64, 16) on sm_90 (causal) and at
# (16, 64) on sm_80 (non-causal; 2 stages spill there with Triton 3.8), and 2 stages 8 B at (128, 32) on sm_80
# (head dims 80/96, causal). Fewer stages change no arithmetic: the results are bit-identical. The spill-free
# alternative that keeps a pipeline at (128, 32), Config(32, 64, 8, 3), would change the key blocking.
DECODE_CONFIGS = {(d, m): Config(m, 64, 4, 3) for d in (16, 32, 64) for m in (16, 32, 64)}
DECODE_CONFIGS.update({(64, 16): Config(16, 64, 4, 2), (16, 64): Config(64, 64, 4, 1),
                       (128, 16): Config(16, 32, 4, 3), (128, 32): Config(32, 128, 4, 1),
                       (128, 64): Config(64, 64, 8, 3)})
_PREPROCESS_BLOCK_M = 64
_COMBINE_BLOCK_R = 16

# Why a decode kernel: one decode step (Tq = 1) reads K and V once, 4*Tk*D bytes per KV head in fp16/bf16,
# for 4*Tk*D*(H // Hkv) FLOPs: about H // Hkv FLOP/byte, far below the ~150-300 FLOP/byte where an A100/H100
# stops being memory-bound. So decode is a bandwidth problem, and the plain forward is the wrong shape for it:
# it launches B*H programs of one useful row each (16 programs for B=1, H=16 on a 108-132 SM GPU), each
# streaming the whole cache, and reads every K/V head H // Hkv times. The decode kernel packs the query heads
# of a KV head into one program (K/V read once per group) and splits the keys so about two programs per SM
# stream the cache; `_attn_combine_kernel` merges the splits by their log-sum-exp.
DECODE_MAX_TQ = 16          # the split-KV path serves calls with at most this many queries ...
DECODE_MAX_ROWS = 64        # ... and at most this many (query head x position) rows per KV head
MIN_BLOCKS_PER_SPLIT = 4    # keys per split >= 4 blocks, so the partial writes and the combine stay small


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _upcast(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot on bf16 multiplies raw bit patterns: compute those dots in fp32 there
    (P and dS are still rounded to bf16 first, as on the GPU)."""
    return dtype == torch.bfloat16 and interpreting()


def _num_splits(batch_kv_heads: int, tk: int, block_n: int, num_sms: int) -> tuple[int, int]:
    """(n_splits, keys_per_split) for the split-KV decode: about two programs per SM, at least
    MIN_BLOCKS_PER_SPLIT key blocks per split."""
    n_blocks = max(1, triton.cdiv(tk, block_n))
    by_occupancy = triton.cdiv(2 * num_sms, max(1, batch_kv_heads))
    by_length = max(1, n_blocks // MIN_BLOCKS_PER_SPLIT)
    splits = max(1, min(by_occupancy, by_length))
    blocks_per_split = triton.cdiv(n_blocks, splits)
    return triton.cdiv(n_blocks, blocks_per_split), blocks_per_split * block_n


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(f"attention: {name}", t, ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype, got q {dtype_name(q.dtype)}, "
                        f"k {dtype_name(k.dtype)}, v {dtype_name(v.dtype)}; cast them to the same dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape (B, Hkv, Tk, D), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    B, H, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"attention: batch sizes differ: q has {B}, k/v have {Bk}")
    if Dk != D:
        raise ValueError(f"attention: head dims differ: q has {D}, k/v have {Dk}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"attention: query heads ({H}) must be a multiple of key/value heads ({Hkv}); "
                         f"q is (B, H, Tq, D) = {tuple(q.shape)}, k/v are (B, Hkv, Tk, D) = {tuple(k.shape)} "
                         f"(a (B, T, H, D) tensor must be transposed to (B, H, T, D) first)")
    if q.dtype == torch.float32 and q.device.type == "cuda":
        raise TypeError("attention: float32 q/k/v run only in Triton's interpreter (for tests); on a GPU the "
                        "kernels take fp16/bf16 (run the model under torch.autocast) or use kernels='torch'")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {D} is not supported by the Triton kernel (1..{MAX_HEAD_DIM}); "
                         f"use kernels='torch' for this model")


def _validate_kv_len(q: torch.Tensor, k: torch.Tensor, kv_len: torch.Tensor) -> None:
    """decode_attention's extra checks (after `_validate`): few queries, kv_len (B,) int32/int64 on q's device.
    Its values are never read on the host (that would sync and break CUDA-graph capture)."""
    B, H, Tq = q.shape[:3]
    group = H // k.shape[1]
    if not 1 <= Tq <= DECODE_MAX_TQ or group * Tq > DECODE_MAX_ROWS:
        raise ValueError(f"decode_attention: takes 1..{DECODE_MAX_TQ} queries and at most {DECODE_MAX_ROWS} "
                         f"(H // Hkv) * Tq rows per KV head, got Tq = {Tq}, H // Hkv = {group}; use attention")
    if not isinstance(kv_len, torch.Tensor):
        raise TypeError(f"decode_attention: kv_len must be a torch.Tensor of shape ({B},), got {type(kv_len).__name__}")
    if kv_len.shape != (B,):
        raise ValueError(f"decode_attention: kv_len must have shape (B,) = ({B},) (valid keys per batch row), "
                         f"got {tuple(kv_len.shape)}")
    if kv_len.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: kv_len must be int32 or int64, got {dtype_name(kv_len.dtype)}")
    if kv_len.device != q.device:
        raise ValueError(f"decode_attention: kv_len must be on q's device {q.device}, got {kv_len.device}")


def _resolve_scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _grad_like(t: torch.Tensor) -> torch.Tensor:
    """Gradient buffer in t's memory layout when that has a unit head-dim stride, else contiguous."""
    if t.stride(-1) == 1 or t.shape[-1] == 1:
        return torch.empty_like(t)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _new_out_lse(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output laid out as (B, Tq, H, D) in memory and returned as a (B, H, Tq, D) view, so the model's
    transpose(1, 2).reshape(B, T, H * D) after attention is free; lse2 (B, H, Tq) fp32."""
    B, H, Tq, D = q.shape
    out = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    return out, lse


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
                  *, config: Config | None = None, split_kv: int | None = None,
                  kv_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher. q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> out (B, H, Tq, D), lse2 (B, H, Tq) fp32, the
    base-2 log-sum-exp of the scaled scores (natural log-sum-exp / ln 2).

    split_kv: None picks the path (split-KV decode when Tq <= DECODE_MAX_TQ and (H // Hkv) * Tq <= DECODE_MAX_ROWS,
    else the FlashAttention-2 forward); 0 forces the FlashAttention-2 forward; n >= 1 forces the decode kernel
    with (at most) n key splits. config overrides the block config of the chosen kernel (tests); for the
    decode kernel its block_m must hold the (H // Hkv) * Tq packed rows.
    kv_len: (B,) int32/int64 on q's device (`decode_attention`): k/v are a cache of Tk slots of which row b
    uses the first kv_len[b]. Takes the decode kernel, which reads kv_len on the device: the grid and the
    splits depend on the shapes only (CUDA-graph capturable).
    """
    _validate(q, k, v)
    if kv_len is not None:
        _validate_kv_len(q, k, kv_len)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = H // Hkv
    scale = _resolve_scale(scale, D)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    out, lse = _new_out_lse(q)
    if out.numel() == 0:
        return out, lse
    block_d = _block_d(D)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, IS_CAUSAL=bool(causal), UPCAST=_upcast(q.dtype))
    if split_kv is None:
        split_kv = -1 if kv_len is not None or (Tq <= DECODE_MAX_TQ and group * Tq <= DECODE_MAX_ROWS) else 0
    if split_kv == 0:
        if kv_len is not None:
            raise ValueError("attention_fwd: kv_len takes the split-KV decode kernel; split_kv=0 is not supported")
        cfg = config or FWD_CONFIGS[block_d]
        grid = (triton.cdiv(Tq, cfg.block_m), B * H)
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            H, group, Tq, Tk, scale * LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
        return out, lse

    if group * Tq > DECODE_MAX_ROWS:
        raise ValueError(f"attention_fwd: the split-KV decode kernel takes at most {DECODE_MAX_ROWS} rows per KV head, "
                         f"got (H // Hkv) * Tq = {group} * {Tq}; use split_kv=0")
    cfg = config or DECODE_CONFIGS[block_d, max(16, triton.next_power_of_2(group * Tq))]
    if cfg.block_m < group * Tq:
        raise ValueError(f"attention_fwd: decode block_m {cfg.block_m} < (H // Hkv) * Tq = {group * Tq}")
    n_splits, keys_per_split = _num_splits(B * Hkv, Tk, cfg.block_n, sm_count(q.device))
    if split_kv > 0:
        blocks = max(1, triton.cdiv(Tk, cfg.block_n))
        keys_per_split = triton.cdiv(blocks, min(split_kv, blocks)) * cfg.block_n
        n_splits = max(1, triton.cdiv(Tk, keys_per_split))
    if n_splits == 1:
        o_part, lse_part = out, lse
        o_strides = (0, *out.stride()[:3])
    else:
        o_part = torch.empty((n_splits, B, H, Tq, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((n_splits, B, H, Tq), dtype=torch.float32, device=q.device)
        o_strides = o_part.stride()[:4]
    _attn_decode_kernel[(n_splits, B * Hkv)](
        q, k, v, o_part, lse_part, None if kv_len is None else kv_len.contiguous(), *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *o_strides, B * H * Tq, H * Tq, Tq,
        Hkv, group, Tq, Tk, keys_per_split, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        HAS_KV_LEN=kv_len is not None, **common)
    if n_splits > 1:
        n_rows = B * H * Tq
        _attn_combine_kernel[(triton.cdiv(n_rows, _COMBINE_BLOCK_R),)](
            o_part, lse_part, out, lse, *out.stride()[:3], H, Tq, n_rows, n_splits,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=_COMBINE_BLOCK_R, num_warps=4)
    return out, lse


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, causal: bool = True, scale: float | None = None, dlse: torch.Tensor | None = None,
                  *, config: tuple[Config, Config] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: (dq, dk, dv) shaped like q, k, v from do/out (B, H, Tq, D), lse (B, H, Tq) fp32 as
    returned by attention_fwd (base 2) and optionally dlse, the gradient with respect to that lse.

    config overrides the (dK/dV kernel, dQ kernel) block configs (tests).
    """
    _validate(q, k, v)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = H // Hkv
    for name, t in (("do", do), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"attention_bwd: {name} must match q's shape {tuple(q.shape)} and dtype "
                             f"{dtype_name(q.dtype)}, got {tuple(t.shape)} {dtype_name(t.dtype)}")
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is not None and (t.shape != (B, H, Tq) or t.dtype != torch.float32):
            raise ValueError(f"attention_bwd: {name} must be ({B}, {H}, {Tq}) float32, got {tuple(t.shape)} "
                             f"{dtype_name(t.dtype)}")
    scale = _resolve_scale(scale, D)
    dq, dk, dv = _grad_like(q), _grad_like(k), _grad_like(v)
    q, k, v, do, out = (unit_last_stride(t) for t in (q, k, v, do, out))
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    if Tk == 0:
        dq.zero_()
    if dq.numel() == 0 and dk.numel() == 0:
        return dq, dk, dv
    block_d = _block_d(D)
    dkdv_cfg, dq_cfg = config or (BWD_DKDV_CONFIGS[block_d], BWD_DQ_CONFIGS[block_d])
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, IS_CAUSAL=bool(causal), UPCAST=_upcast(q.dtype))

    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if delta.numel():
        _attn_bwd_preprocess_kernel[(triton.cdiv(Tq, _PREPROCESS_BLOCK_M), B * H)](
            out, do, dlse if dlse is not None else delta, delta, *out.stride()[:3], *do.stride()[:3], H, Tq,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=_PREPROCESS_BLOCK_M, HAS_DLSE=dlse is not None, num_warps=4)
    if dk.numel():
        _attn_bwd_dkdv_kernel[(triton.cdiv(Tk, dkdv_cfg.block_n), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3], Hkv, group, Tq, Tk, scale, scale * LOG2E,
            BLOCK_M=dkdv_cfg.block_m, BLOCK_N=dkdv_cfg.block_n, num_warps=dkdv_cfg.num_warps,
            num_stages=dkdv_cfg.num_stages, **common)
    if dq.numel() and Tk:
        _attn_bwd_dq_kernel[(triton.cdiv(Tq, dq_cfg.block_m), B * H)](
            q, k, v, do, lse, delta, dq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dq.stride()[:3], H, group, Tq, Tk, scale, scale * LOG2E,
            BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n, num_warps=dq_cfg.num_warps,
            num_stages=dq_cfg.num_stages, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), differentiable.
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("tritongpt::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, causal, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, causal, scale):
    return _new_out_lse(q)


@torch.library.custom_op("tritongpt::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, dlse: torch.Tensor | None, causal: bool,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, out, lse, causal, scale, dlse)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, causal, scale):
    return _grad_like(q), _grad_like(k), _grad_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.set_materialize_grads(False)  # dlse stays None unless the log-sum-exp output is used


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd_op(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# Inference only: no autograd registration (a backward through it raises PyTorch's "no autograd" error).
@torch.library.custom_op("tritongpt::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                         scale: float) -> torch.Tensor:
    return attention_fwd(q, k, v, True, scale, kv_len=kv_len)[0]


@_decode_attention_op.register_fake
def _(q, k, v, kv_len, scale):
    return _new_out_lse(q)[0]


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------

def _attention_op(q, k, v, causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(q, k, v)
    return _attention_fwd_op(q, k, v, bool(causal), _resolve_scale(scale, q.shape[-1]))


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention` that also returns the log-sum-exp of the scaled scores per query row, (B, H, Tq) fp32,
    natural log (`kernels.reference.attention_lse`). Differentiable in q, k, v through both outputs."""
    out, lse2 = _attention_op(q, k, v, causal, scale)
    return out, lse2 * LN2


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ end-aligned causal mask]) v with grouped-query heads.

    q (B, H, Tq, D), k/v (B, Hkv, Tk, D), H % Hkv == 0, D <= 128; fp16 or bf16 (fp32 in the interpreter),
    any strides. Returns (B, H, Tq, D) in q's dtype. Default scale 1/sqrt(D). Differentiable in q, k and v.
    """
    return _attention_op(q, k, v, causal, scale)[0]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Causal attention of a few new queries over a preallocated (static) KV cache, masked by length.

    q (B, H, Tq, D) with 1 <= Tq <= DECODE_MAX_TQ and (H // Hkv) * Tq <= DECODE_MAX_ROWS; k/v (B, Hkv, L, D):
    the whole cache of capacity L, any strides (e.g. views `cache_k[layer]`); kv_len (B,) int32/int64 on q's
    device: the valid keys of each batch row. Query i of row b sits at position kv_len[b] - Tq + i and sees
    keys j <= that position (`attention(causal=True)` with Tk = kv_len[b]); keys at j >= kv_len[b] are never
    read, so they may hold anything. A query that sees no key (kv_len[b] = 0) gives 0. kv_len is read on the
    device only (values outside [0, L] are clamped there): the launch depends on the shapes alone, so it can
    be captured in a CUDA graph, and `torch.compile(fullgraph=True)` sees one opaque op. Returns
    (B, H, Tq, D) in q's dtype. Inference only (not differentiable).
    """
    _validate(q, k, v)
    _validate_kv_len(q, k, kv_len)
    return _decode_attention_op(q, k, v, kv_len, _resolve_scale(scale, q.shape[-1]))


# ----------------------------------------------------------------------------------------------------------
# Compile report (python -m kernels.report)
# ----------------------------------------------------------------------------------------------------------

def compile_specs(quick: bool = False) -> list[CompileSpec]:
    """Every kernel configuration the launchers can pick on a GPU.

    Full: head_dim 16, 32, 64, 80, 96, 128; fp16 and bf16; causal and not; decode block_m 16/32/64, and each
    causal decode config again with a kv_len pointer (`decode_attention`), int32 and int64. The tables
    hold one config per head dim for all GPUs, so every spec is meant for (and compiled for) sm_80 and sm_90.
    Quick: head_dim 64 and 128, causal; the tensor-core kernels in fp16 and bf16, decode block_m 16 and 64
    (and 16 with kv_len: int32 at head_dim 64, int64 at 128), the row-wise kernels in bf16.
    """
    head_dims = (64, 128) if quick else (16, 32, 64, 80, 96, 128)
    specs = []
    for head_dim, dtype in itertools.product(head_dims, (torch.float16, torch.bfloat16)):
        dt = TORCH_TO_TL_NAME[dtype]
        block_d = _block_d(head_dim)
        for causal in (True,) if quick else (True, False):
            flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, IS_CAUSAL=causal, UPCAST=False)
            case = f"D={head_dim} {dt} {'causal' if causal else 'full'}"

            def add(fn, cfg, pointers, floats, note="", **extra):
                constexprs = dict(flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **extra)
                specs.append(CompileSpec(fn.__name__, fn, signature(fn, pointers, floats, constexprs), constexprs,
                                         cfg.num_warps, cfg.num_stages,
                                         f"{case} BM={cfg.block_m} BN={cfg.block_n}{note}", expects_mma=True))

            io = {"Q": dt, "K": dt, "V": dt, "O": dt, "LSE": "fp32"}
            add(_attn_fwd_kernel, FWD_CONFIGS[block_d], io, ("qk_scale",))
            for block_m in () if quick and dtype != torch.bfloat16 else (16, 64) if quick else (16, 32, 64):
                cfg = DECODE_CONFIGS[block_d, block_m]
                add(_attn_decode_kernel, cfg, io, ("qk_scale",), KV_LEN=None, HAS_KV_LEN=False)
                kv_dts = ("i32", "i64")  # decode_attention's kv_len, always causal
                if quick:
                    kv_dts = (kv_dts[head_dim == 128],) if block_m == 16 else ()
                for kv_dt in kv_dts if causal else ():
                    add(_attn_decode_kernel, cfg, dict(io, KV_LEN=kv_dt), ("qk_scale",), f" kv_len {kv_dt}",
                        HAS_KV_LEN=True)
            grads = {"Q": dt, "K": dt, "V": dt, "DO": dt, "LSE": "fp32", "DELTA": "fp32", "DQ": dt, "DK": dt, "DV": dt}
            add(_attn_bwd_dkdv_kernel, BWD_DKDV_CONFIGS[block_d], grads, ("sm_scale", "qk_scale"))
            add(_attn_bwd_dq_kernel, BWD_DQ_CONFIGS[block_d], grads, ("sm_scale", "qk_scale"))

        # The row-wise kernels do not depend on the mask.
        if quick and dtype != torch.bfloat16:
            continue
        for has_dlse in (False,) if quick else (False, True):
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=_PREPROCESS_BLOCK_M, HAS_DLSE=has_dlse)
            fn = _attn_bwd_preprocess_kernel
            specs.append(CompileSpec(
                fn.__name__, fn,
                signature(fn, {"O": dt, "DO": dt, "DLSE": "fp32", "DELTA": "fp32"}, (), constexprs),
                constexprs, 4, 1, f"D={head_dim} {dt} BM={_PREPROCESS_BLOCK_M} dlse={has_dlse}"))
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=_COMBINE_BLOCK_R)
        fn = _attn_combine_kernel
        specs.append(CompileSpec(
            fn.__name__, fn,
            signature(fn, {"O_PART": "fp32", "LSE_PART": "fp32", "O": dt, "LSE": "fp32"}, (), constexprs),
            constexprs, 4, 1, f"D={head_dim} {dt} BR={_COMBINE_BLOCK_R}"))
    return specs
