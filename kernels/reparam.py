"""Triton kernels and launchers for the reparameterisation trick z = mu + exp(logvar / 2) * eps.

With no eps given, eps ~ N(0, 1) is drawn inside the kernel with Philox (``tl.randn``) from a seed
read from device memory (so graphs replay with fresh noise) and the element's logical row-major
index; it is never written to memory. The backward pass draws the same eps again from the same seed:

    d mu = g  (no kernel: the upstream gradient itself),   d logvar = g * eps * exp(logvar / 2) / 2,
    d eps = g * exp(logvar / 2)  (only when a given eps requires grad).

The tensors [M, L] are walked as flat 1-D arrays, BLOCK elements per program: with contiguous
inputs the loads and stores are 128-bit vectors; other strides are read through (row, column)
offsets computed from the flat index. Outputs are new contiguous tensors.

K samples per input (``num_samples=K``, for importance-weighted bounds): z [K, M, L] with
z[k, i] = mu[i] + exp(logvar[i] / 2) * eps[k, i]. The forward walks the K * M * L outputs as one
flat array (flat index k * M * L + i, which is also the Philox offset of the drawn eps[k, i], so
sample 0 draws what K = None draws from the same seed). The backward runs one program per BLOCK
inputs i and loops over k = 0 .. K-1 in order (deterministic, no atomics), drawing eps again:

    d mu[i] = sum_k g[k, i],   d logvar[i] = sum_k g[k, i] * eps[k, i] * exp(logvar[i] / 2) / 2,
    d eps[k, i] = g[k, i] * exp(logvar[i] / 2).

Both are accumulated in fp32 and rounded once. With K = None the same kernels run with K = 1 and
d mu is the upstream gradient itself (no kernel).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import cdiv
from .launch import Static, launch

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
    n, n_in, L,
    stride_mb, stride_ml, stride_vb, stride_vl, stride_eb, stride_el,
    CONTIG: tl.constexpr, HAS_EPS: tl.constexpr, RNG64: tl.constexpr, SAMPLES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # n = K * n_in outputs; output k * n_in + i reads input i (SAMPLES: K > 1 may occur)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < n
    i = offs % n_in if SAMPLES else offs
    mu = tl.load(mu_ptr + _strided(i, L, stride_mb, stride_ml, CONTIG), mask=m, other=0).to(tl.float32)
    lv = tl.load(logvar_ptr + _strided(i, L, stride_vb, stride_vl, CONTIG), mask=m, other=0).to(tl.float32)
    e = _eps(eps_ptr, seed_ptr, offs, m, L, stride_eb, stride_el, CONTIG, HAS_EPS, RNG64)
    z = mu + tl.exp(0.5 * lv) * e
    tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=m)


@triton.jit
def _reparam_bwd_kernel(
    g_ptr, logvar_ptr, eps_ptr, seed_ptr, dmu_ptr, dlogvar_ptr, deps_ptr,
    n_in, K, L,
    stride_gb, stride_gl, stride_vb, stride_vl, stride_eb, stride_el,
    CONTIG: tl.constexpr, HAS_EPS: tl.constexpr, RNG64: tl.constexpr, EPS_GRAD: tl.constexpr,
    DMU: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program per BLOCK inputs i; the K samples k * n_in + i are summed in order k = 0, 1, ...
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < n_in
    lv = tl.load(logvar_ptr + _strided(offs, L, stride_vb, stride_vl, CONTIG), mask=m, other=0).to(tl.float32)
    sigma = tl.exp(0.5 * lv)
    acc_mu = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ge = tl.zeros([BLOCK], dtype=tl.float32)
    o = offs                                      # int64 flat index k * n_in + i of sample k
    for _k in range(0, K):
        g = tl.load(g_ptr + _strided(o, L, stride_gb, stride_gl, CONTIG), mask=m, other=0).to(tl.float32)
        e = _eps(eps_ptr, seed_ptr, o, m, L, stride_eb, stride_el, CONTIG, HAS_EPS, RNG64)
        acc_mu += g
        acc_ge += g * e
        if EPS_GRAD:
            tl.store(deps_ptr + o, (g * sigma).to(deps_ptr.dtype.element_ty), mask=m)
        o += n_in
    tl.store(dlogvar_ptr + offs, (0.5 * acc_ge * sigma).to(dlogvar_ptr.dtype.element_ty), mask=m)
    if DMU:
        tl.store(dmu_ptr + offs, acc_mu.to(dmu_ptr.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=256)
def _static(n_in: int, K: int, L: int, strides: tuple, contig: bool, has_eps: bool, forward: bool,
            eps_grad: bool = False, dmu: bool = False):
    # the forward's or the backward's arguments fixed by the shapes, strides and options
    (s0b, s0l), (s1b, s1l), (seb, sel) = strides
    common = dict(L=L, stride_vb=s1b, stride_vl=s1l, stride_eb=seb, stride_el=sel, CONTIG=contig,
                  HAS_EPS=has_eps, RNG64=K * n_in >= 2**31, BLOCK=_BLOCK, num_warps=_WARPS)
    if forward:  # strides: mu, logvar, eps
        return Static(n=K * n_in, n_in=n_in, stride_mb=s0b, stride_ml=s0l, SAMPLES=K > 1, **common)
    # strides: grad, logvar, eps
    return Static(n_in=n_in, K=K, stride_gb=s0b, stride_gl=s0l, EPS_GRAD=eps_grad, DMU=dmu, **common)


def _strides(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def reparam_forward(kernel_launch, mu, logvar, eps, seed, num_samples: int = 0):
    """z from 2-D ``mu``/``logvar`` [M, L] and either ``eps`` or a one-element int64 ``seed``:
    [M, L] (``num_samples=0``, eps [M, L]) or [K * M, L] for K = ``num_samples`` >= 1 (eps
    [K * M, L], sample k in rows k * M .. k * M + M - 1), in mu's and logvar's promoted dtype."""
    out_dtype = mu.dtype if mu.dtype == logvar.dtype else torch.promote_types(mu.dtype, logvar.dtype)
    M, L = mu.shape
    K = max(num_samples, 1)
    n_in = M * L
    z = torch.empty((K * M, L), device=mu.device, dtype=out_dtype)
    contig = mu.is_contiguous() and logvar.is_contiguous() and (eps is None or eps.is_contiguous())
    static = _static(n_in, K, L, (_strides(mu), _strides(logvar), _strides(eps)), contig, eps is not None,
                     forward=True)
    launch(kernel_launch, _reparam_fwd_kernel, (cdiv(K * n_in, _BLOCK),), static, made=("z_ptr",),
           mu_ptr=mu, logvar_ptr=logvar,
           eps_ptr=eps if eps is not None else mu, seed_ptr=seed if seed is not None else mu, z_ptr=z)
    return z


def reparam_backward(kernel_launch, grad, logvar, eps, seed, eps_grad: bool, num_samples: int = 0):
    """(d mu or None, d logvar, d eps or None) for upstream ``grad``
    ([M, L], or [K * M, L] for K = ``num_samples`` >= 1). d mu is only computed for K >= 1
    (with ``num_samples=0`` it is ``grad`` itself); it is returned in logvar's dtype."""
    M, L = logvar.shape
    K = max(num_samples, 1)
    n_in = M * L
    dense = torch.contiguous_format
    dmu = torch.empty_like(logvar, memory_format=dense) if num_samples else None
    dlogvar = torch.empty_like(logvar, memory_format=dense)
    deps = torch.empty((K * M, L), device=logvar.device, dtype=eps.dtype) if eps_grad else None
    contig = grad.is_contiguous() and logvar.is_contiguous() and (eps is None or eps.is_contiguous())
    static = _static(n_in, K, L, (_strides(grad), _strides(logvar), _strides(eps)), contig, eps is not None,
                     forward=False, eps_grad=eps_grad, dmu=bool(num_samples))
    # the gradients made here need no checks: their dtypes follow logvar's and eps's
    launch(kernel_launch, _reparam_bwd_kernel, (cdiv(n_in, _BLOCK),), static,
           made=("dmu_ptr", "dlogvar_ptr", "deps_ptr"), g_ptr=grad, logvar_ptr=logvar,
           eps_ptr=eps if eps is not None else logvar, seed_ptr=seed if seed is not None else logvar,
           # valid pointers, never written without the flags
           dmu_ptr=dmu if num_samples else dlogvar, dlogvar_ptr=dlogvar, deps_ptr=deps if eps_grad else dlogvar)
    return dmu, dlogvar, deps
