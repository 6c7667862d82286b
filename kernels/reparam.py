"""Triton kernels and launchers for the reparameterisation trick z = mu + exp(logvar / 2) * eps.

With no eps given, eps ~ N(0, 1) is drawn inside the kernel with Philox (``tl.randn``) from a seed
read from device memory (so graphs replay with fresh noise) and the element's logical row-major
index; it is never written to memory. The backward pass draws the same eps again from the same seed:

    d mu = g  (no kernel: the upstream gradient itself),   d logvar = g * eps * exp(logvar / 2) / 2,
    d eps = g * exp(logvar / 2)  (only when a given eps requires grad).

The tensors [M, L] are walked as flat 1-D arrays, BLOCK elements per program: with contiguous
inputs the loads and stores are 128-bit vectors; other strides are read through (row, column)
offsets computed from the flat index. Outputs are new contiguous tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024
_WARPS = 4


@triton.jit
def _strided(offs, L, stride_r, stride_c, CONTIG: tl.constexpr):
    # memory offsets of the flat row-major indices `offs` of an [M, L] tensor with these strides
    if CONTIG:
        return offs
    return (offs // L) * stride_r + (offs % L) * stride_c


@triton.jit
def _eps(eps_ptr, seed_ptr, offs, m, L, stride_eb, stride_el,
         CONTIG: tl.constexpr, HAS_EPS: tl.constexpr, RNG64: tl.constexpr):
    # the noise of the flat indices `offs`: read from eps, or drawn from the seed (same draw in the
    # forward and the backward). Returns values only: store offsets stay in the kernel bodies.
    if HAS_EPS:
        e = tl.load(eps_ptr + _strided(offs, L, stride_eb, stride_el, CONTIG), mask=m, other=0).to(tl.float32)
    else:
        seed = tl.load(seed_ptr)
        e = tl.randn(seed, offs) if RNG64 else tl.randn(seed, offs.to(tl.int32))
    return e


@triton.jit
def _reparam_fwd_kernel(
    mu_ptr, logvar_ptr, eps_ptr, seed_ptr, z_ptr,
    n, L,
    stride_mb, stride_ml, stride_vb, stride_vl, stride_eb, stride_el,
    CONTIG: tl.constexpr, HAS_EPS: tl.constexpr, RNG64: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < n
    mu = tl.load(mu_ptr + _strided(offs, L, stride_mb, stride_ml, CONTIG), mask=m, other=0).to(tl.float32)
    lv = tl.load(logvar_ptr + _strided(offs, L, stride_vb, stride_vl, CONTIG), mask=m, other=0).to(tl.float32)
    e = _eps(eps_ptr, seed_ptr, offs, m, L, stride_eb, stride_el, CONTIG, HAS_EPS, RNG64)
    z = mu + tl.exp(0.5 * lv) * e
    tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=m)


@triton.jit
def _reparam_bwd_kernel(
    g_ptr, logvar_ptr, eps_ptr, seed_ptr, dlogvar_ptr, deps_ptr,
    n, L,
    stride_gb, stride_gl, stride_vb, stride_vl, stride_eb, stride_el,
    CONTIG: tl.constexpr, HAS_EPS: tl.constexpr, RNG64: tl.constexpr, EPS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < n
    g = tl.load(g_ptr + _strided(offs, L, stride_gb, stride_gl, CONTIG), mask=m, other=0).to(tl.float32)
    lv = tl.load(logvar_ptr + _strided(offs, L, stride_vb, stride_vl, CONTIG), mask=m, other=0).to(tl.float32)
    e = _eps(eps_ptr, seed_ptr, offs, m, L, stride_eb, stride_el, CONTIG, HAS_EPS, RNG64)
    sigma = tl.exp(0.5 * lv)
    tl.store(dlogvar_ptr + offs, (0.5 * g * e * sigma).to(dlogvar_ptr.dtype.element_ty), mask=m)
    if EPS_GRAD:
        tl.store(deps_ptr + offs, (g * sigma).to(deps_ptr.dtype.element_ty), mask=m)


def _strides(*ts):
    out = []
    for t in ts:
        out += [t.stride(0), t.stride(1)] if t is not None else [0, 0]
    return out


def reparam_forward(kernel_launch, mu, logvar, eps, seed, out_dtype):
    """z [M, L] from 2-D ``mu``/``logvar`` and either ``eps`` [M, L] or a one-element int64 ``seed``."""
    M, L = mu.shape
    n = M * L
    z = torch.empty((M, L), device=mu.device, dtype=out_dtype)
    contig = all(t is None or t.is_contiguous() for t in (mu, logvar, eps))
    kernel_launch(_reparam_fwd_kernel)[(triton.cdiv(n, _BLOCK),)](
        mu, logvar, eps if eps is not None else mu, seed if seed is not None else mu, z, n, L,
        *_strides(mu, logvar, eps),
        CONTIG=contig, HAS_EPS=eps is not None, RNG64=n >= 2**31, BLOCK=_BLOCK, num_warps=_WARPS,
    )
    return z


def reparam_backward(kernel_launch, grad, logvar, eps, seed, eps_grad: bool):
    """(d logvar, d eps or an empty tensor) for upstream ``grad`` [M, L]."""
    M, L = logvar.shape
    n = M * L
    dlogvar = torch.empty((M, L), device=logvar.device, dtype=logvar.dtype)
    deps = torch.empty((M, L) if eps_grad else (0,), device=logvar.device,
                       dtype=eps.dtype if eps is not None else logvar.dtype)
    contig = all(t is None or t.is_contiguous() for t in (grad, logvar, eps))
    kernel_launch(_reparam_bwd_kernel)[(triton.cdiv(n, _BLOCK),)](
        grad, logvar, eps if eps is not None else logvar, seed if seed is not None else logvar,
        dlogvar, deps if eps_grad else dlogvar,  # a valid pointer, never written without EPS_GRAD
        n, L, *_strides(grad, logvar, eps),
        CONTIG=contig, HAS_EPS=eps is not None, RNG64=n >= 2**31, EPS_GRAD=eps_grad,
        BLOCK=_BLOCK, num_warps=_WARPS,
    )
    return dlogvar, deps
