"""Triton kernels and launchers for the reparameterisation trick z = mu + exp(logvar / 2) * eps.

With no eps given, eps ~ N(0, 1) is drawn inside the kernel with Philox (``tl.randn``) from a seed
read from device memory (so graphs replay with fresh noise) and the element's logical index; it is
never written to memory. The backward pass draws the same eps again from the same seed.
Inputs are 2-D views [M, L] with arbitrary strides; outputs are new contiguous tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import load_tile, load_tile_pair, row_block

_TILE = 2048


@triton.jit
def _noise(seed_ptr, eps_ptr, rows, cols, L, stride_eb, stride_el, m,
           HAS_EPS: tl.constexpr, RNG64: tl.constexpr):
    if HAS_EPS:
        e = load_tile(eps_ptr, rows, cols, stride_eb, stride_el, m, 0)
    else:
        seed = tl.load(seed_ptr)
        idx = rows[:, None] * L + cols[None, :]
        if RNG64:
            e = tl.randn(seed, idx)
        else:
            e = tl.randn(seed, idx.to(tl.int32))
    return e


@triton.jit
def _reparam_fwd_kernel(
    mu_ptr, logvar_ptr, eps_ptr, seed_ptr, z_ptr,
    M, L,
    stride_mb, stride_ml, stride_vb, stride_vl, stride_eb, stride_el,
    HAS_EPS: tl.constexpr, RNG64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows, row_ok = row_block(M, BLOCK_M)
    for l0 in range(0, L, BLOCK_L):
        cols, m, mu, lv = load_tile_pair(mu_ptr, logvar_ptr, rows, row_ok, l0, L, stride_mb, stride_ml,
                                         stride_vb, stride_vl, 0, False, BLOCK_L)
        e = _noise(seed_ptr, eps_ptr, rows, cols, L, stride_eb, stride_el, m, HAS_EPS, RNG64)
        z = mu + tl.exp(0.5 * lv) * e
        tl.store(z_ptr + rows[:, None] * L + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=m)


@triton.jit
def _reparam_bwd_kernel(
    g_ptr, logvar_ptr, eps_ptr, seed_ptr, dlogvar_ptr, deps_ptr,
    M, L,
    stride_gb, stride_gl, stride_vb, stride_vl, stride_eb, stride_el,
    HAS_EPS: tl.constexpr, RNG64: tl.constexpr, EPS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows, row_ok = row_block(M, BLOCK_M)
    for l0 in range(0, L, BLOCK_L):
        cols, m, g, lv = load_tile_pair(g_ptr, logvar_ptr, rows, row_ok, l0, L, stride_gb, stride_gl,
                                        stride_vb, stride_vl, 0, False, BLOCK_L)
        e = _noise(seed_ptr, eps_ptr, rows, cols, L, stride_eb, stride_el, m, HAS_EPS, RNG64)
        sigma = tl.exp(0.5 * lv)
        out = rows[:, None] * L + cols[None, :]
        tl.store(dlogvar_ptr + out, (0.5 * g * e * sigma).to(dlogvar_ptr.dtype.element_ty), mask=m)
        if EPS_GRAD:
            tl.store(deps_ptr + out, (g * sigma).to(deps_ptr.dtype.element_ty), mask=m)


def _blocks(L: int):
    # from the latent size only, so a changing batch size reuses one kernel configuration
    block_l = min(256, triton.next_power_of_2(max(L, 1)))
    block_m = max(1, _TILE // block_l)
    return block_m, block_l


def _eps_args(eps, seed, like):
    """(eps pointer, seed pointer, eps strides): an unused pointer gets ``like``'s."""
    if eps is not None:
        return eps, like, eps.stride(0), eps.stride(1)
    return like, seed, 0, 0


def reparam_forward(kernel_launch, mu, logvar, eps, seed, out_dtype):
    """z [M, L] from 2-D ``mu``/``logvar`` and either ``eps`` [M, L] or a one-element int64 ``seed``."""
    M, L = mu.shape
    block_m, block_l = _blocks(L)
    z = torch.empty((M, L), device=mu.device, dtype=out_dtype)
    eps_t, seed_t, seb, sel = _eps_args(eps, seed, mu)
    kernel_launch(_reparam_fwd_kernel)[(triton.cdiv(M, block_m),)](
        mu, logvar, eps_t, seed_t, z, M, L,
        mu.stride(0), mu.stride(1), logvar.stride(0), logvar.stride(1), seb, sel,
        HAS_EPS=eps is not None, RNG64=M * L >= 2**31, BLOCK_M=block_m, BLOCK_L=block_l,
    )
    return z


def reparam_backward(kernel_launch, grad, logvar, eps, seed, eps_grad: bool):
    """(d logvar, d eps or an empty tensor) for upstream ``grad`` [M, L]."""
    M, L = logvar.shape
    block_m, block_l = _blocks(L)
    dlogvar = torch.empty((M, L), device=logvar.device, dtype=logvar.dtype)
    deps = torch.empty((M, L) if eps_grad else (0,), device=logvar.device,
                       dtype=eps.dtype if eps is not None else logvar.dtype)
    eps_t, seed_t, seb, sel = _eps_args(eps, seed, logvar)
    kernel_launch(_reparam_bwd_kernel)[(triton.cdiv(M, block_m),)](
        grad, logvar, eps_t, seed_t, dlogvar,
        deps if eps_grad else dlogvar,  # a valid pointer that is never written without EPS_GRAD
        M, L,
        grad.stride(0), grad.stride(1), logvar.stride(0), logvar.stride(1), seb, sel,
        HAS_EPS=eps is not None, RNG64=M * L >= 2**31, EPS_GRAD=eps_grad,
        BLOCK_M=block_m, BLOCK_L=block_l,
    )
    return dlogvar, deps
