"""Fused decoder output layer + log-likelihood: per-row log p(x | z) without the logits in memory.

Given the decoder's last hidden activations h [M, H], its output layer W [D, H] (``nn.Linear``'s
layout) and bias b [D], and each row's target image x [D], the kernel returns, per row r,

    log p(x | z_r) = -sum_j nll(l_rj, x_j),        l_r = W h_r + b,

with the per-pixel ``nll`` of :func:`fastvae.kernels.likelihoods.decoder_nll` (never copied here).
The logits are made tile by tile in registers (``tl.dot``, fp32 accumulation) and reduced in the
epilogue; they are never written.

Rows and images. Row r belongs to image ``(r // group) % n_img``: ``group = k, n_img = b`` for
image-major rows [b, k] (the evaluator: k samples of each of b images), ``group = 1, n_img = B``
for sample-major rows [K, B] (``iwae_loss``: z of shape [K, B, L]).

No per-logit work for the x.l term. For the Bernoulli (logits) and continuous-Bernoulli
likelihoods the nll is linear in the target: ``nll(l, t) = nll(l, 0) - l t``, so

    sum_j nll(l_j, x_j) = sum_j nll(l_j, 0) - x.l,     x.l = (W^T x) . h + b . x,

with ``W^T x`` [H] and ``b . x`` computed once per image (by the launcher, a [n_img, D] x [D, H]
matmul) and shared by all its rows: the kernel never loads x. Other likelihoods (Gaussian,
Bernoulli probabilities) load the target tile per logit tile.

Grid: one program per BLOCK_M rows, walking D in BLOCK_N tiles and, for each, H in BLOCK_K steps
(``acc += h_tile @ W_tile^T``). Fixed order, no atomics: deterministic. Offsets are int64.
fp32 inputs use IEEE fp32 products (``input_precision="ieee"``: TF32's 10-bit mantissa would cost
~1e-3 relative per logit), 16-bit inputs the tensor cores' native products.

Backward (``decoder_log_px_backward``): with g_r the upstream gradient of row r and
``d_rj = g_r * d nll / d l_rj`` (recomputed tile by tile from the same logits, never stored as a
whole), ``grad h = -d W`` and ``grad W = -d^T h``, ``grad b = -sum_r d_r``. The kernel writes the
``d`` tile of a chunk of rows; the launcher (:func:`fastvae.iwae`) consumes it chunk by chunk, so
no [M, D] buffer ever exists.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cdiv
from .likelihoods import BERNOULLI_LOGITS, CONT_BERNOULLI, decoder_nll, likelihood_code, likelihood_params

_BLOCK_M = 64
_BLOCK_N = 64
_BLOCK_K = 32
_WARPS = 4

# likelihoods whose nll is linear in the target: nll(l, t) = nll(l, 0) - l t
LINEAR_IN_TARGET = (BERNOULLI_LOGITS, CONT_BERNOULLI)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, rmask, cols, cmask, H,
                 stride_hm, stride_wd, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # l[rows, cols] = h[rows, :] @ W[cols, :]^T + b[cols], fp32 accumulation
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + ks
        kmask = kk < H
        a = tl.load(h_ptr + rows[:, None] * stride_hm + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wd + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _decoder_log_px_kernel(
    h_ptr, w_ptr, b_ptr, x_ptr, xw_ptr, xb_ptr, out_ptr,
    M, D, H, group, n_img, inv_sigma, log_norm,
    stride_hm, stride_wd, stride_xn, stride_xwn,
    LIKELIHOOD: tl.constexpr, LINEAR_T: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < M
    img = (rows // group) % n_img
    nll_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    ns = tl.arange(0, BLOCK_N).to(tl.int64)
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + ns
        cmask = cols < D
        s = _logits_tile(h_ptr, w_ptr, b_ptr, rows, rmask, cols, cmask, H, stride_hm, stride_wd,
                         HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        if LINEAR_T:
            t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            t = tl.load(x_ptr + img[:, None] * stride_xn + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        nll, _ds, _dt, _dsig = decoder_nll(s, t, inv_sigma, log_norm, LIKELIHOOD)
        nll_rows += tl.sum(tl.where(cmask[None, :], nll, 0.0), axis=1)
    if LINEAR_T:
        # x.l = (W^T x) . h + b . x, from the per-image xw = x @ W and xb = x . b
        ks = tl.arange(0, BLOCK_K).to(tl.int64)
        xl = tl.load(xb_ptr + img, mask=rmask, other=0.0).to(tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + ks
            m2 = rmask[:, None] & (kk < H)[None, :]
            a = tl.load(h_ptr + rows[:, None] * stride_hm + kk[None, :], mask=m2, other=0.0).to(tl.float32)
            v = tl.load(xw_ptr + img[:, None] * stride_xwn + kk[None, :], mask=m2, other=0.0)
            xl += tl.sum(a * v, axis=1)
        nll_rows -= xl
    tl.store(out_ptr + rows, -nll_rows, mask=rmask)


@triton.jit
def _decoder_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, x_ptr, g_ptr, d_ptr,
    M, D, H, group, n_img, inv_sigma, log_norm,
    stride_hm, stride_wd, stride_xn,
    LIKELIHOOD: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # d[r, j] = g_r * d nll(l_rj, x_j) / d l_rj for a chunk of rows (the logits recomputed)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < M
    img = (rows // group) % n_img
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cmask = cols < D
    s = _logits_tile(h_ptr, w_ptr, b_ptr, rows, rmask, cols, cmask, H, stride_hm, stride_wd,
                     HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    m2 = rmask[:, None] & cmask[None, :]
    t = tl.load(x_ptr + img[:, None] * stride_xn + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    _nll, ds, _dt, _dsig = decoder_nll(s, t, inv_sigma, log_norm, LIKELIHOOD)
    tl.store(d_ptr + rows[:, None] * D + cols[None, :], (g[:, None] * ds).to(d_ptr.dtype.element_ty), mask=m2)


def _precision(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None  # 16-bit inputs: native tensor-core products


def _likelihood_args(likelihood: str, sigma: float):
    return (likelihood_code(likelihood, True), *likelihood_params(likelihood, sigma))


def _unit_stride(t):
    # rows read with unit column stride (the tiles' inner dimension)
    return t if t.stride(1) == 1 else t.contiguous()


def decoder_log_px(kernel_launch, h, weight, bias, x, group: int, likelihood: str = "bernoulli",
                   sigma: float = 1.0):
    """log p(x | z) per row of ``h`` [M, H]: fp32 [M]. ``x`` [n_img, D] holds one target image per
    image; row r uses image ``(r // group) % n_img``."""
    M, H = h.shape
    D = weight.shape[0]
    n_img = x.shape[0]
    h, weight, x = _unit_stride(h), _unit_stride(weight.to(h.dtype)), _unit_stride(x)
    code, inv_sigma, log_norm = _likelihood_args(likelihood, sigma)
    linear = code in LINEAR_IN_TARGET
    if linear:
        xf = x.to(torch.float32)
        xw = (xf @ weight.to(torch.float32)).contiguous()                  # [n_img, H]: W^T x per image
        xb = xf @ bias.to(torch.float32) if bias is not None else torch.zeros(n_img, device=x.device)
    else:
        xw, xb = x, x  # unused pointers
    out = torch.empty(M, device=h.device, dtype=torch.float32)
    kernel_launch(_decoder_log_px_kernel)[(cdiv(M, _BLOCK_M),)](
        h, weight, bias if bias is not None else weight, x, xw, xb, out,
        M, D, H, group, n_img, inv_sigma, log_norm,
        h.stride(0), weight.stride(0), x.stride(0), xw.stride(0),
        LIKELIHOOD=code, LINEAR_T=linear, HAS_BIAS=bias is not None, PRECISION=_precision(h.dtype),
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=_WARPS,
    )
    return out


def decoder_dlogits(kernel_launch, h, weight, bias, x, g, group: int, likelihood: str = "bernoulli",
                    sigma: float = 1.0):
    """d [M, D] fp32 with d[r, j] = g[r] * d nll / d l_rj for the rows of ``h`` (a chunk)."""
    M, H = h.shape
    D = weight.shape[0]
    h, weight, x = _unit_stride(h), _unit_stride(weight.to(h.dtype)), _unit_stride(x)
    code, inv_sigma, log_norm = _likelihood_args(likelihood, sigma)
    d = torch.empty(M, D, device=h.device, dtype=torch.float32)
    kernel_launch(_decoder_dlogits_kernel)[(cdiv(M, _BLOCK_M), cdiv(D, _BLOCK_N))](
        h, weight, bias if bias is not None else weight, x, g.contiguous(), d,
        M, D, H, group, x.shape[0], inv_sigma, log_norm,
        h.stride(0), weight.stride(0), x.stride(0),
        LIKELIHOOD=code, HAS_BIAS=bias is not None, PRECISION=_precision(h.dtype),
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=_WARPS,
    )
    return d
