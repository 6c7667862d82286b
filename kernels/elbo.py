"""Triton kernels and launchers for the VAE loss: Bernoulli BCE summed over pixels + beta * Gaussian KL.

Per sample i:   loss_i = sum_j bce(recon_ij, x_ij) + beta * 0.5 * sum_k (mu^2 + exp(logvar) - 1 - logvar)

* forward: one pass over recon and x; one program owns BLOCK_M whole rows, so each row's sum is
  accumulated in fp32 in a fixed order, then a single-program kernel sums the rows in a fixed
  order for "sum"/"mean". No atomics, so the loss is bitwise reproducible.
* backward: one pass that reads recon and x again and writes d recon (and d x if asked) in the
  input dtype, plus d mu and d logvar. grad_output is read from device memory (stride 0 for a
  scalar), so there is no host sync.

The launchers take 2-D views [B, N] / [B, L] with arbitrary strides (no copies) and never write
into their inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import load_tile_pair, row_block

_MAX_BLOCK_N = 1024
_MAX_BLOCK_M = 64
_TILE = 4096  # elements per (BLOCK_M x BLOCK_N) tile


@triton.jit
def _log1p_small(e):
    # log(1 + e) for e in [0, 1], accurate also where 1 + e rounds to 1 (Goldberg's trick);
    # portable to the interpreter and every backend (no libdevice).
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _elbo_rows_kernel(
    recon_ptr, x_ptr, mu_ptr, logvar_ptr, rows_ptr,
    B, N, L,
    stride_rb, stride_rn, stride_xb, stride_xn,
    stride_mb, stride_ml, stride_vb, stride_vl,
    beta,
    FROM_LOGITS: tl.constexpr, X_U8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows, row_ok = row_block(B, BLOCK_M)
    beta = tl.cast(beta, tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols, m, s, t = load_tile_pair(recon_ptr, x_ptr, rows, row_ok, n0, N, stride_rb, stride_rn,
                                       stride_xb, stride_xn, 0.5, X_U8, BLOCK_N)
        if FROM_LOGITS:
            # max(s, 0) - s*t + log(1 + exp(-|s|)): no sigmoid, no overflow
            val = tl.maximum(s, 0.0) - s * t + _log1p_small(tl.exp(-tl.abs(s)))
        else:
            # F.binary_cross_entropy: logs clamped at -100
            logp = tl.maximum(tl.log(s), -100.0)
            log1mp = tl.maximum(tl.log(1.0 - s), -100.0)
            val = -(t * logp + (1.0 - t) * log1mp)
        acc += tl.where(m, val, 0.0)
    bce = tl.sum(acc, axis=1)

    kacc = tl.zeros([BLOCK_M, BLOCK_L], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cols, m, mu, lv = load_tile_pair(mu_ptr, logvar_ptr, rows, row_ok, l0, L, stride_mb, stride_ml,
                                         stride_vb, stride_vl, 0, False, BLOCK_L)
        kacc += tl.where(m, mu * mu + tl.exp(lv) - 1.0 - lv, 0.0)
    kl = 0.5 * tl.sum(kacc, axis=1)

    tl.store(rows_ptr + rows, bce + beta * kl, mask=row_ok)


@triton.jit
def _sum_kernel(in_ptr, out_ptr, n, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    # one program, fixed order: deterministic
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(in_ptr + offs, mask=offs < n, other=0.0)
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / n
    tl.store(out_ptr, total)


@triton.jit
def _elbo_bwd_kernel(
    g_ptr, stride_g,
    recon_ptr, x_ptr, mu_ptr, logvar_ptr,
    drecon_ptr, dx_ptr, dmu_ptr, dlogvar_ptr,
    B, N, L,
    stride_rb, stride_rn, stride_xb, stride_xn,
    stride_mb, stride_ml, stride_vb, stride_vl,
    beta,
    MEAN: tl.constexpr, FROM_LOGITS: tl.constexpr, X_U8: tl.constexpr, X_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows, row_ok = row_block(B, BLOCK_M)
    g = tl.load(g_ptr + rows * stride_g, mask=row_ok, other=0.0).to(tl.float32)
    if MEAN:
        g = g / B
    g2 = g[:, None]

    for n0 in range(0, N, BLOCK_N):
        cols, m, s, t = load_tile_pair(recon_ptr, x_ptr, rows, row_ok, n0, N, stride_rb, stride_rn,
                                       stride_xb, stride_xn, 0.5, X_U8, BLOCK_N)
        if FROM_LOGITS:
            d = tl.sigmoid(s) - t
        else:
            # PyTorch's binary_cross_entropy_backward: (p - t) / max(p (1 - p), 1e-12)
            d = (s - t) / tl.maximum(s * (1.0 - s), 1e-12)
        out = rows[:, None] * N + cols[None, :]
        tl.store(drecon_ptr + out, (g2 * d).to(drecon_ptr.dtype.element_ty), mask=m)
        if X_GRAD:
            if FROM_LOGITS:
                dt = -s
            else:
                # exact derivative of the clamped loss w.r.t. the target
                dt = tl.maximum(tl.log(1.0 - s), -100.0) - tl.maximum(tl.log(s), -100.0)
            tl.store(dx_ptr + out, (g2 * dt).to(dx_ptr.dtype.element_ty), mask=m)

    gb = g2 * tl.cast(beta, tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cols, m, mu, lv = load_tile_pair(mu_ptr, logvar_ptr, rows, row_ok, l0, L, stride_mb, stride_ml,
                                         stride_vb, stride_vl, 0, False, BLOCK_L)
        out = rows[:, None] * L + cols[None, :]
        tl.store(dmu_ptr + out, (gb * mu).to(dmu_ptr.dtype.element_ty), mask=m)
        tl.store(dlogvar_ptr + out, (gb * 0.5 * (tl.exp(lv) - 1.0)).to(dlogvar_ptr.dtype.element_ty), mask=m)


def _blocks(N: int, L: int):
    # from the feature sizes only, so a changing batch size (symbolic under torch.compile)
    # reuses one kernel configuration
    block_n = min(_MAX_BLOCK_N, triton.next_power_of_2(max(N, 1)))
    block_m = max(1, min(_MAX_BLOCK_M, _TILE // block_n))  # capped: tiny N must not make huge tiles
    block_l = min(128, triton.next_power_of_2(max(L, 1)))
    return block_m, block_n, block_l


def _launch_args(recon, x, mu, logvar):
    return (
        recon.stride(0), recon.stride(1), x.stride(0), x.stride(1),
        mu.stride(0), mu.stride(1), logvar.stride(0), logvar.stride(1),
    )


def elbo_forward(kernel_launch, recon, x, mu, logvar, beta: float, from_logits: bool, reduction: str):
    """Loss (float32) of 2-D ``recon``/``x`` [B, N] and ``mu``/``logvar`` [B, L].

    ``kernel_launch`` wraps a kernel for launching (``torch.library.wrap_triton`` inside a
    ``triton_op``, or the identity).
    """
    B, N = recon.shape
    L = mu.shape[1]
    block_m, block_n, block_l = _blocks(N, L)
    rows = torch.empty(B, device=recon.device, dtype=torch.float32)
    kernel_launch(_elbo_rows_kernel)[(triton.cdiv(B, block_m),)](
        recon, x, mu, logvar, rows, B, N, L, *_launch_args(recon, x, mu, logvar), float(beta),
        FROM_LOGITS=from_logits, X_U8=x.dtype == torch.uint8,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_L=block_l,
        num_warps=8 if block_m * block_n >= 4096 else 4,
    )
    if reduction == "none":
        return rows
    out = torch.empty((), device=recon.device, dtype=torch.float32)
    kernel_launch(_sum_kernel)[(1,)](rows, out, B, MEAN=reduction == "mean", BLOCK=1024, num_warps=4)
    return out


def elbo_backward(kernel_launch, grad, recon, x, mu, logvar, beta: float, from_logits: bool,
                  reduction: str, x_grad: bool):
    """(d recon, d x or an empty tensor, d mu, d logvar), each contiguous in its input's dtype."""
    B, N = recon.shape
    L = mu.shape[1]
    block_m, block_n, block_l = _blocks(N, L)
    drecon = torch.empty((B, N), device=recon.device, dtype=recon.dtype)
    dx = torch.empty((B, N) if x_grad else (0,), device=x.device, dtype=x.dtype)
    dmu = torch.empty((B, L), device=mu.device, dtype=mu.dtype)
    dlogvar = torch.empty((B, L), device=logvar.device, dtype=logvar.dtype)
    stride_g = 0 if grad.dim() == 0 else grad.stride(0)
    kernel_launch(_elbo_bwd_kernel)[(triton.cdiv(B, block_m),)](
        grad, stride_g, recon, x, mu, logvar, drecon,
        dx if x_grad else drecon,  # a valid pointer that is never written when x_grad is False
        dmu, dlogvar, B, N, L, *_launch_args(recon, x, mu, logvar), float(beta),
        MEAN=reduction == "mean", FROM_LOGITS=from_logits, X_U8=x.dtype == torch.uint8, X_GRAD=x_grad,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_L=block_l,
        num_warps=8 if block_m * block_n >= 4096 else 4,
    )
    return drecon, dx, dmu, dlogvar
