"""Triton kernels and launchers for the VAE loss: Bernoulli BCE summed over pixels + beta * Gaussian KL.

Per sample i:   loss_i = sum_j bce(recon_ij, x_ij) + beta * 0.5 * sum_k (mu_ik^2 + exp(lv_ik) - 1 - lv_ik)

Single pass. When a gradient will be needed, the forward kernel also writes the gradients of the
loss with grad_output = 1 (d recon, d x if asked, d mu, d logvar) while each tile is in registers:
fp32 moves 12 bytes per pixel (read recon and x, write d recon) instead of the 20 of a forward and
a separate backward pass. The backward only has to multiply by grad_output: ``scale_grads_`` reads
grad_output on the device (no host sync) and every program returns at once when it is 1, so a
plain ``loss.backward()`` moves no bytes at all; otherwise it scales the op's own buffers in place.

Two tilings:

* flat (``sum``/``mean`` on contiguous inputs): the BCE needs no per-row sums, so recon and x are
  walked as 1-D arrays, ``ITERS`` blocks of ``BLOCK`` elements per program with no masked lanes
  but in the last program, then the latents likewise; each program writes one fp32 partial sum.
* rows (``none``, or strided inputs): a program owns ``BLOCK_M`` whole rows and walks them in
  ``BLOCK_N``-wide column blocks; it writes the per-row losses, or one partial sum.

Partial sums are added by one program in a fixed order (two-stage reduction, no atomics): the loss
is bitwise reproducible. Offsets are int64, accumulation fp32, and every store offset is computed
in the kernel body, so torch's analysis of which tensors a kernel writes sees only the outputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# flat tiling: BLOCK elements per step, ITERS steps per program; with 8 warps a thread holds 8
# elements per stream and step (fp32: two 128-bit loads, bf16: one), at 48 registers (fp32, sm_90);
# partial sums are added by one program in blocks of SUM_BLOCK
_FLAT_BLOCK = 2048
_FLAT_ITERS = 2
_FLAT_WARPS = 8
_SUM_BLOCK = 1024
# row tiling: BLOCK_M rows x BLOCK_N columns per step (784 columns: 7 steps of 128, 12% masked);
# with 8 warps a thread holds 4 elements per stream and step: 128-bit accesses in fp32, 64-bit in
# bf16/fp16, where 8 elements (128-bit) would take up to 72 registers (below 50% occupancy)
_ROW_TILE = 1024
_MAX_BLOCK_N = 128
_MAX_BLOCK_L = 64


# ---- the math, once: value and derivatives of each per-element term ----------------------------

@triton.jit
def _log1p_small(e):
    # log(1 + e) for e in [0, 1] without a log: log(1 + e) = 2 atanh(w) with w = e / (2 + e) in
    # [0, 1/3], = 2 (w + w^3/3 + w^5/5 + ...). Stopping at w^15 leaves < w^17 / 17 < 5e-10 relative.
    # Accurate for tiny e too (2w -> e), fused multiply-adds only: ~2x fewer instructions than
    # libdevice's log plus the correction that the rounding of 1 + e needs, and the interpreter
    # runs the same arithmetic.
    w = e / (2.0 + e)
    w2 = w * w
    p = 1.0 / 15.0
    p = p * w2 + 1.0 / 13.0
    p = p * w2 + 1.0 / 11.0
    p = p * w2 + 1.0 / 9.0
    p = p * w2 + 1.0 / 7.0
    p = p * w2 + 1.0 / 5.0
    p = p * w2 + 1.0 / 3.0
    p = p * w2 + 1.0
    return 2.0 * w * p


@triton.jit
def bernoulli_nll(s, t, FROM_LOGITS: tl.constexpr):
    """(nll, d nll / d s, d nll / d t) of a Bernoulli pixel with target t in [0, 1].

    Logits s: nll = max(s, 0) - s t + log(1 + e^-|s|),  d/ds = sigmoid(s) - t,  d/dt = -s;
    every term stays accurate relative to itself at confident logits (|s| up to ~87).
    Probabilities s (F.binary_cross_entropy, logs clamped at -100):
        nll = -(t log s + (1 - t) log(1 - s)),  d/ds = (s - t) / max(s (1 - s), 1e-12),
        d/dt = log(1 - s) - log(s) (clamped: the exact derivative of the clamped loss).
    """
    if FROM_LOGITS:
        e = tl.exp(-tl.abs(s))                       # in (0, 1]: no overflow
        nll = tl.maximum(s, 0.0) - s * t + _log1p_small(e)
        q = e / (1.0 + e)                            # sigmoid(-|s|)
        # sigmoid(s) - t from the same e, as (1 - t) - q for s >= 0: no cancellation when t = 1
        ds = tl.where(s >= 0.0, (1.0 - t) - q, q - t)
        dt = -s
    else:
        logp = tl.maximum(tl.log(s), -100.0)
        log1mp = tl.maximum(tl.log(1.0 - s), -100.0)
        nll = -(t * logp + (1.0 - t) * log1mp)
        ds = (s - t) / tl.maximum(s * (1.0 - s), 1e-12)
        dt = log1mp - logp
    return nll, ds, dt


@triton.jit
def gaussian_kl(mu, lv):
    """(kl, d kl / d mu, d kl / d lv) of one latent: 0.5 (mu^2 + e^lv - 1 - lv)."""
    v = tl.exp(lv)
    return 0.5 * (mu * mu + v - 1.0 - lv), mu, 0.5 * (v - 1.0)


# ---- forward (+ gradients): flat tiling -----------------------------------------------------------

@triton.jit
def _elbo_flat_kernel(
    recon_ptr, x_ptr, mu_ptr, logvar_ptr, partial_ptr,
    drecon_ptr, dx_ptr, dmu_ptr, dlogvar_ptr,
    n_pix, n_lat, pix_programs,
    beta, scale,
    FROM_LOGITS: tl.constexpr, X_U8: tl.constexpr, GRAD: tl.constexpr, X_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    # programs [0, pix_programs) walk the pixels, the rest the latents; one fp32 partial each.
    # `scale` is d loss / d row loss (1, or 1/B for "mean"), folded into the stored gradients.
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if pid < pix_programs:
        start = pid.to(tl.int64) * (BLOCK * ITERS)
        for i in range(ITERS):
            offs = start + i * BLOCK + lanes
            m = offs < n_pix
            s = tl.load(recon_ptr + offs, mask=m, other=0.5).to(tl.float32)
            t = tl.load(x_ptr + offs, mask=m, other=0).to(tl.float32)
            if X_U8:
                t = t / 255.0
            nll, ds, dt = bernoulli_nll(s, t, FROM_LOGITS)
            acc += tl.where(m, nll, 0.0)
            if GRAD:
                tl.store(drecon_ptr + offs, (ds * scale).to(drecon_ptr.dtype.element_ty), mask=m)
            if X_GRAD:
                tl.store(dx_ptr + offs, (dt * scale).to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))
    else:
        beta = tl.cast(beta, tl.float32)
        start = (pid - pix_programs).to(tl.int64) * (BLOCK * ITERS)
        for i in range(ITERS):
            offs = start + i * BLOCK + lanes
            m = offs < n_lat
            mu = tl.load(mu_ptr + offs, mask=m, other=0).to(tl.float32)
            lv = tl.load(logvar_ptr + offs, mask=m, other=0).to(tl.float32)
            kl, dmu, dlv = gaussian_kl(mu, lv)
            acc += tl.where(m, kl, 0.0)
            if GRAD:
                tl.store(dmu_ptr + offs, (dmu * (beta * scale)).to(dmu_ptr.dtype.element_ty), mask=m)
                tl.store(dlogvar_ptr + offs, (dlv * (beta * scale)).to(dlogvar_ptr.dtype.element_ty), mask=m)
        tl.store(partial_ptr + pid, beta * tl.sum(acc, axis=0))


# ---- forward (+ gradients): row tiling, any strides -------------------------------------------------

@triton.jit
def _elbo_rows_kernel(
    recon_ptr, x_ptr, mu_ptr, logvar_ptr, out_ptr,
    drecon_ptr, dx_ptr, dmu_ptr, dlogvar_ptr,
    B, N, L,
    stride_rb, stride_rn, stride_xb, stride_xn,
    stride_mb, stride_ml, stride_vb, stride_vl,
    beta, scale,
    FROM_LOGITS: tl.constexpr, X_U8: tl.constexpr, GRAD: tl.constexpr, X_GRAD: tl.constexpr,
    PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # one program owns BLOCK_M whole rows; it writes their losses (PARTIAL=False, out is [B]) or
    # their sum (PARTIAL=True, out is one fp32 per program). Gradients are written contiguous.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < B
    beta = tl.cast(beta, tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m = row_ok[:, None] & (cols < N)[None, :]
        s = tl.load(recon_ptr + rows[:, None] * stride_rb + cols[None, :] * stride_rn,
                    mask=m, other=0.5).to(tl.float32)
        t = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xn,
                    mask=m, other=0).to(tl.float32)
        if X_U8:
            t = t / 255.0
        nll, ds, dt = bernoulli_nll(s, t, FROM_LOGITS)
        acc += tl.where(m, nll, 0.0)
        out = rows[:, None] * N + cols[None, :]
        if GRAD:
            tl.store(drecon_ptr + out, (ds * scale).to(drecon_ptr.dtype.element_ty), mask=m)
        if X_GRAD:
            tl.store(dx_ptr + out, (dt * scale).to(dx_ptr.dtype.element_ty), mask=m)
    bce = tl.sum(acc, axis=1)

    kacc = tl.zeros([BLOCK_M, BLOCK_L], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        m = row_ok[:, None] & (cols < L)[None, :]
        mu = tl.load(mu_ptr + rows[:, None] * stride_mb + cols[None, :] * stride_ml,
                     mask=m, other=0).to(tl.float32)
        lv = tl.load(logvar_ptr + rows[:, None] * stride_vb + cols[None, :] * stride_vl,
                     mask=m, other=0).to(tl.float32)
        kl, dmu, dlv = gaussian_kl(mu, lv)
        kacc += tl.where(m, kl, 0.0)
        if GRAD:
            out = rows[:, None] * L + cols[None, :]
            tl.store(dmu_ptr + out, (dmu * (beta * scale)).to(dmu_ptr.dtype.element_ty), mask=m)
            tl.store(dlogvar_ptr + out, (dlv * (beta * scale)).to(dlogvar_ptr.dtype.element_ty), mask=m)
    loss = bce + beta * tl.sum(kacc, axis=1)

    if PARTIAL:
        tl.store(out_ptr + tl.program_id(0), tl.sum(tl.where(row_ok, loss, 0.0), axis=0))
    else:
        tl.store(out_ptr + rows, loss, mask=row_ok)


@triton.jit
def _sum_kernel(in_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    # stage two of the reduction: one program adds the partial sums in a fixed order
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(in_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


# ---- backward: multiply the gradients written by the forward by grad_output ------------------------

@triton.jit
def _grad_output(g_ptr, stride_g, offs, m, width, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    # grad_output for the flat indices `offs` of a contiguous [B, width] buffer: one scalar, or the
    # value of each element's row (PER_ROW). Returns values only.
    if PER_ROW:
        g = tl.load(g_ptr + (offs // width) * stride_g, mask=m, other=1.0).to(tl.float32)
    else:
        g = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(g_ptr).to(tl.float32)
    return g


@triton.jit
def _must_scale(g):
    # a slice whose g values are all exactly 1 is left untouched (NaN != 1: it is scaled)
    return tl.sum((g != 1.0).to(tl.int32), axis=0) != 0


@triton.jit
def _scale_grads_kernel(
    g_ptr, stride_g,
    a_ptr, b_ptr, c_ptr, d_ptr,
    n_ab, n_cd, N, L, ab_programs,
    HAS_B: tl.constexpr, PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    # buffer *= g, in place, for the forward's contiguous gradients: a, b are [B, N] (d recon, d x),
    # c, d are [B, L] (d mu, d logvar); grad_output g is one scalar (stride_g = 0) or one value
    # per row (PER_ROW). A program whose g values are all 1 returns before touching its slice, so
    # grad_output = 1 moves no bytes. (The two pairs have their own dtypes, so each keeps its
    # own branch.)
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    if pid < ab_programs:
        offs = pid.to(tl.int64) * BLOCK + lanes
        m = offs < n_ab
        g = _grad_output(g_ptr, stride_g, offs, m, N, PER_ROW, BLOCK)
        if _must_scale(g):
            va = tl.load(a_ptr + offs, mask=m, other=0).to(tl.float32)
            tl.store(a_ptr + offs, (va * g).to(a_ptr.dtype.element_ty), mask=m)
            if HAS_B:
                vb = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
                tl.store(b_ptr + offs, (vb * g).to(b_ptr.dtype.element_ty), mask=m)
    else:
        offs = (pid - ab_programs).to(tl.int64) * BLOCK + lanes
        m = offs < n_cd
        g = _grad_output(g_ptr, stride_g, offs, m, L, PER_ROW, BLOCK)
        if _must_scale(g):
            vc = tl.load(c_ptr + offs, mask=m, other=0).to(tl.float32)
            tl.store(c_ptr + offs, (vc * g).to(c_ptr.dtype.element_ty), mask=m)
            vd = tl.load(d_ptr + offs, mask=m, other=0).to(tl.float32)
            tl.store(d_ptr + offs, (vd * g).to(d_ptr.dtype.element_ty), mask=m)


# ---- launchers ---------------------------------------------------------------------------------

def _row_blocks(N: int, L: int):
    # from the feature sizes only, so a changing batch size (symbolic under torch.compile)
    # reuses one kernel configuration
    block_n = min(_MAX_BLOCK_N, triton.next_power_of_2(max(N, 1)))
    block_m = max(1, min(64, _ROW_TILE // block_n))  # capped: tiny N must not make huge tiles
    block_l = min(_MAX_BLOCK_L, triton.next_power_of_2(max(L, 1)))
    return block_m, block_n, block_l


def _flat(recon, x, mu, logvar) -> bool:
    """The flat tiling applies: every input dense in row-major order (recon and x then share
    their flat element order, and so do mu and logvar)."""
    return all(t.is_contiguous() for t in (recon, x, mu, logvar))


def elbo_forward(kernel_launch, recon, x, mu, logvar, beta: float, from_logits: bool, reduction: str,
                 grad: bool, x_grad: bool):
    """(loss, d recon, d x, d mu, d logvar) for 2-D ``recon``/``x`` [B, N] and ``mu``/``logvar`` [B, L].

    The loss is float32: a scalar for "sum"/"mean", [B] for "none". With ``grad`` the four
    gradients of the loss for grad_output = 1 are written in the same pass, contiguous in their
    input's dtype (d x only with ``x_grad``); otherwise (and for d x without ``x_grad``) they are
    empty tensors. ``kernel_launch`` wraps a kernel for launching (``torch.library.wrap_triton``
    inside a ``triton_op``, or the identity).
    """
    B, N = recon.shape
    L = mu.shape[1]
    dev = recon.device
    x_grad = grad and x_grad
    drecon = torch.empty((B, N) if grad else (0,), device=dev, dtype=recon.dtype)
    dx = torch.empty((B, N) if x_grad else (0,), device=dev, dtype=x.dtype)
    dmu = torch.empty((B, L) if grad else (0,), device=dev, dtype=mu.dtype)
    dlogvar = torch.empty((B, L) if grad else (0,), device=dev, dtype=logvar.dtype)
    # a pointer that is never written stands in for a buffer that is not asked for
    ptrs = (drecon if grad else recon, dx if x_grad else recon, dmu if grad else mu,
            dlogvar if grad else logvar)
    scale = 1.0 / B if reduction == "mean" else 1.0
    flags = dict(FROM_LOGITS=from_logits, X_U8=x.dtype == torch.uint8, GRAD=grad, X_GRAD=x_grad)

    if reduction != "none" and _flat(recon, x, mu, logvar):
        per = _FLAT_BLOCK * _FLAT_ITERS
        pix_programs = triton.cdiv(B * N, per)
        programs = pix_programs + triton.cdiv(B * L, per)
        partial = torch.empty(programs, device=dev, dtype=torch.float32)
        kernel_launch(_elbo_flat_kernel)[(programs,)](
            recon, x, mu, logvar, partial, *ptrs, B * N, B * L, pix_programs, float(beta), scale,
            **flags, BLOCK=_FLAT_BLOCK, ITERS=_FLAT_ITERS, num_warps=_FLAT_WARPS,
        )
    else:
        block_m, block_n, block_l = _row_blocks(N, L)
        programs = triton.cdiv(B, block_m)
        partial = torch.empty(B if reduction == "none" else programs, device=dev, dtype=torch.float32)
        kernel_launch(_elbo_rows_kernel)[(programs,)](
            recon, x, mu, logvar, partial, *ptrs, B, N, L,
            recon.stride(0), recon.stride(1), x.stride(0), x.stride(1),
            mu.stride(0), mu.stride(1), logvar.stride(0), logvar.stride(1),
            float(beta), scale, **flags, PARTIAL=reduction != "none",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_L=block_l,
            num_warps=8,
        )
        if reduction == "none":
            return partial, drecon, dx, dmu, dlogvar
    loss = torch.empty((), device=dev, dtype=torch.float32)
    kernel_launch(_sum_kernel)[(1,)](partial, loss, partial.shape[0], scale, BLOCK=_SUM_BLOCK, num_warps=4)
    return loss, drecon, dx, dmu, dlogvar


def scale_grads_(kernel_launch, grad, drecon, dx, dmu, dlogvar) -> None:
    """Multiply the forward's gradient buffers in place by ``grad`` (a scalar, or [B] per row).

    Programs whose grad values are all 1 return at once. ``dx`` may be empty (not asked for).
    """
    B, N = drecon.shape
    L = dmu.shape[1]
    stride_g = 0 if grad.dim() == 0 else grad.stride(0)
    ab_programs = triton.cdiv(B * N, _FLAT_BLOCK)
    programs = ab_programs + triton.cdiv(B * L, _FLAT_BLOCK)
    has_b = dx.numel() > 0
    kernel_launch(_scale_grads_kernel)[(programs,)](
        grad, stride_g, drecon, dx if has_b else drecon, dmu, dlogvar,  # no d x: never touched
        B * N, B * L, N, L, ab_programs,
        HAS_B=has_b, PER_ROW=grad.dim() > 0, BLOCK=_FLAT_BLOCK, num_warps=_FLAT_WARPS,
    )
