"""Triton kernels and launchers for the VAE loss: reconstruction NLL summed over pixels + beta * KL.

Per sample i (the per-pixel math of every likelihood is in ``likelihoods.py``):

    rec_i = sum_j nll(recon_ij, x_ij),   kl_i = sum_k 0.5 (mu_ik^2 + exp(lv_ik) - 1 - lv_ik),
    kl_eff_i = sum_k (kl_ik if dimension k is active else free_bits),   loss_i = rec_i + beta kl_eff_i

(with free bits, dimension k is active when its KL averaged over the batch exceeds the floor;
without, kl_eff = kl). The op's output is the four of them, reduced over the batch ("sum",
"batchmean") or per row ("none"): the loss and its logged components come from one pass.

Single pass. When a gradient will be needed, the forward kernel also writes, while each tile is in
registers, the gradients of the reconstruction (d recon, d x and d sigma if asked) and of the
unweighted KL (d mu, d logvar), times d loss / d row (1, or 1/B): fp32 moves 12 bytes per pixel
(read recon and x, write d recon) instead of the 20 of a forward and a separate backward pass. The
backward multiplies them in place by their factors, read on the device (no host sync):
``g0 + g1`` for the pixel gradients and ``(beta g0 + g3) active_k + g2`` for the latent ones, with
g the grad_output of (loss, reconstruction, kl, kl_eff); a tile whose factors are all 1 is left
untouched, so a plain ``loss.backward()`` with beta = 1 moves no further bytes (with beta != 1 it
rewrites d mu and d logvar: 16 bytes per latent, against 12 per pixel).

Two tilings:

* flat (``sum``/``batchmean`` on contiguous inputs, a number for sigma, no free bits): recon and x
  are walked as 1-D arrays, ``ITERS`` blocks of ``BLOCK`` elements per program with no masked
  lanes but in the last program, then the latents likewise; each program writes its partial sums.
* rows (``none``, strided inputs, a sigma tensor, free bits): a program owns ``BLOCK_M`` whole rows
  and walks them in ``BLOCK_N``-wide column blocks; it writes the per-row values, or partial sums.

Partial sums are added in a fixed order by the program that finishes last, in the same launch (a
ticket counter tells it; no float atomics): the loss is bitwise reproducible. Offsets are int64,
accumulation fp32, and every store offset is computed in the kernel body, so torch's analysis of
which tensors a kernel writes sees only the outputs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import cdiv, next_power_of_2
from .launch import Static, launch

# flat tiling: BLOCK elements per step, ITERS steps per program; with 8 warps a thread holds 8
# elements per stream and step (fp32: two 128-bit loads, bf16: one), at 48 registers (fp32, sm_90);
# partial sums are added by the last program in blocks of SUM_BLOCK
_FLAT_BLOCK = 2048
_FLAT_ITERS = 2
_FLAT_WARPS = 8
_SUM_BLOCK = 1024
# the backward's scaling walks the pixels in flat blocks of _FLAT_BLOCK and the latents in tiles of
# _LAT_TILE elements (rows x dimensions): tiles of 2048 took up to 108 registers (25% occupancy)
_LAT_TILE = 1024
# row tiling: BLOCK_M rows x BLOCK_N columns per step (784 columns: 7 steps of 128, 12% masked);
# with 8 warps a thread holds 4 elements per stream and step: 128-bit accesses in fp32, 64-bit in
# bf16/fp16, where 8 elements (128-bit) would take up to 72 registers (below 50% occupancy)
_ROW_TILE = 1024
_MAX_BLOCK_N = 128
_MAX_BLOCK_L = 64


from .likelihoods import (BERNOULLI_PROBS, CONT_BERNOULLI, decoder_nll, gaussian_kl, gaussian_sigma_params,
                          likelihood_code)

# ---- forward (+ gradients): flat tiling -----------------------------------------------------------

@triton.jit
def _latent_terms(mu, lv, act_ptr, dims, m, free_bits, FREE_BITS: tl.constexpr):
    # (kl, kl_eff, d kl / d mu, d kl / d lv) of latents of dimensions `dims` (masked by m): with
    # free bits, a dimension whose batch-mean KL is below the floor counts free_bits instead
    kl, dmu, dlv = gaussian_kl(mu, lv)
    kl = tl.where(m, kl, 0.0)
    if FREE_BITS:
        active = tl.load(act_ptr + dims, mask=m, other=0.0)
        kl_eff = tl.where(m, tl.where(active != 0.0, kl, free_bits), 0.0)
    else:
        kl_eff = kl
    return kl, kl_eff, dmu, dlv


@triton.jit
def _totals(partial_ptr, counter_ptr, out_ptr, programs, beta, scale,
            TERMS: tl.constexpr, SUM_BLOCK: tl.constexpr):
    # The reduction's second stage, in the program that finishes last: every program has stored
    # its partial sums (reconstruction, kl, kl_eff) to partial[0..2, pid] and takes a ticket; the
    # one holding the last ticket adds the rows in a fixed order (bitwise reproducible, no float
    # atomics) and sets the counter back to 0 for the next launch on this stream:
    #   loss = scale (sum rec + beta sum kl_eff),  and with TERMS: scale sum rec, scale sum kl,
    #   scale sum kl_eff after it (out [4]; without TERMS out holds the loss alone)
    tl.debug_barrier()                      # the program's partial sums are stored before its ticket
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == programs - 1:
        beta = tl.cast(beta, tl.float32)
        rec = tl.zeros([SUM_BLOCK], dtype=tl.float32)
        kl = tl.zeros([SUM_BLOCK], dtype=tl.float32)
        kl_eff = tl.zeros([SUM_BLOCK], dtype=tl.float32)
        for i0 in range(0, programs, SUM_BLOCK):
            offs = i0 + tl.arange(0, SUM_BLOCK).to(tl.int64)
            m = offs < programs
            rec += tl.load(partial_ptr + offs, mask=m, other=0.0, volatile=True)
            kl += tl.load(partial_ptr + programs + offs, mask=m, other=0.0, volatile=True)
            kl_eff += tl.load(partial_ptr + 2 * programs + offs, mask=m, other=0.0, volatile=True)
        r = tl.sum(rec, axis=0) * scale
        e = tl.sum(kl_eff, axis=0) * scale
        tl.store(out_ptr, r + beta * e)
        if TERMS:
            tl.store(out_ptr + 1, r)
            tl.store(out_ptr + 2, tl.sum(kl, axis=0) * scale)
            tl.store(out_ptr + 3, e)
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _elbo_flat_kernel(
    recon_ptr, x_ptr, mu_ptr, logvar_ptr, partial_ptr, counter_ptr, out_ptr,
    drecon_ptr, dx_ptr, dmu_ptr, dlogvar_ptr,
    n_pix, n_lat, pix_programs, programs,
    inv_sigma, log_norm, beta, scale,
    LIKELIHOOD: tl.constexpr, X_U8: tl.constexpr, GRAD: tl.constexpr, X_GRAD: tl.constexpr,
    TERMS: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, SUM_BLOCK: tl.constexpr,
):
    # programs [0, pix_programs) walk the pixels, the rest the latents; each writes its three
    # fp32 partial sums (reconstruction, kl, kl_eff = kl: no free bits here) to partial[0..2, pid],
    # and the last one to finish writes the totals (see _totals). `scale` is d loss / d row loss
    # (1, or 1/B for "batchmean"), folded into the stored gradients, which are those of the
    # reconstruction and of the (unweighted) KL: the backward applies beta.
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    if pid < pix_programs:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid.to(tl.int64) * (BLOCK * ITERS)
        for i in range(ITERS):
            offs = start + i * BLOCK + lanes
            m = offs < n_pix
            s = tl.load(recon_ptr + offs, mask=m, other=0.5).to(tl.float32)
            t = tl.load(x_ptr + offs, mask=m, other=0).to(tl.float32)
            if X_U8:
                t = t / 255.0
            nll, ds, dt, _ = decoder_nll(s, t, inv_sigma, log_norm, LIKELIHOOD)
            acc += tl.where(m, nll, 0.0)
            if GRAD:
                tl.store(drecon_ptr + offs, (ds * scale).to(drecon_ptr.dtype.element_ty), mask=m)
            if X_GRAD:
                tl.store(dx_ptr + offs, (dt * scale).to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))
        tl.store(partial_ptr + programs + pid, 0.0)
        tl.store(partial_ptr + 2 * programs + pid, 0.0)
    else:
        kacc = tl.zeros([BLOCK], dtype=tl.float32)
        start = (pid - pix_programs).to(tl.int64) * (BLOCK * ITERS)
        for i in range(ITERS):
            offs = start + i * BLOCK + lanes
            m = offs < n_lat
            mu = tl.load(mu_ptr + offs, mask=m, other=0).to(tl.float32)
            lv = tl.load(logvar_ptr + offs, mask=m, other=0).to(tl.float32)
            kl, dmu, dlv = gaussian_kl(mu, lv)
            kacc += tl.where(m, kl, 0.0)
            if GRAD:
                tl.store(dmu_ptr + offs, (dmu * scale).to(dmu_ptr.dtype.element_ty), mask=m)
                tl.store(dlogvar_ptr + offs, (dlv * scale).to(dlogvar_ptr.dtype.element_ty), mask=m)
        tl.store(partial_ptr + pid, 0.0)
        kl_sum = tl.sum(kacc, axis=0)
        tl.store(partial_ptr + programs + pid, kl_sum)
        tl.store(partial_ptr + 2 * programs + pid, kl_sum)
    _totals(partial_ptr, counter_ptr, out_ptr, programs, beta, scale, TERMS, SUM_BLOCK)


# ---- forward (+ gradients): row tiling, any strides -------------------------------------------------

@triton.jit
def _elbo_rows_kernel(
    recon_ptr, x_ptr, sigma_ptr, mu_ptr, logvar_ptr, act_ptr, partial_ptr, counter_ptr, out_ptr,
    drecon_ptr, dx_ptr, dsigma_ptr, dmu_ptr, dlogvar_ptr,
    B, N, L, programs,
    stride_rb, stride_rn, stride_xb, stride_xn, stride_sb, stride_sn,
    stride_mb, stride_ml, stride_vb, stride_vl,
    inv_sigma, log_norm, beta, free_bits, scale,
    LIKELIHOOD: tl.constexpr, X_U8: tl.constexpr, GRAD: tl.constexpr, X_GRAD: tl.constexpr,
    SIGMA_PTR: tl.constexpr, SIGMA_GRAD: tl.constexpr, FREE_BITS: tl.constexpr,
    PARTIAL: tl.constexpr, TERMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr, SUM_BLOCK: tl.constexpr,
):
    # one program owns BLOCK_M whole rows. PARTIAL=False: it writes their (loss, reconstruction,
    # kl, kl_eff) to out[0..3, rows] (out is [4, B]); PARTIAL=True: the sums of their
    # reconstruction, kl and kl_eff to partial[0..2, pid], and the last program to finish writes
    # the totals to out (see _totals). Gradients are written contiguous.
    # SIGMA_PTR: the Gaussian's sigma is a tensor read per element (through its strides).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < B

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
        if SIGMA_PTR:
            sig = tl.load(sigma_ptr + rows[:, None] * stride_sb + cols[None, :] * stride_sn,
                          mask=m, other=1.0).to(tl.float32)
            sig_inv, sig_log_norm = gaussian_sigma_params(sig)
            nll, ds, dt, dsig = decoder_nll(s, t, sig_inv, sig_log_norm, LIKELIHOOD)
        else:
            nll, ds, dt, dsig = decoder_nll(s, t, inv_sigma, log_norm, LIKELIHOOD)
        acc += tl.where(m, nll, 0.0)
        out = rows[:, None] * N + cols[None, :]
        if GRAD:
            tl.store(drecon_ptr + out, (ds * scale).to(drecon_ptr.dtype.element_ty), mask=m)
        if X_GRAD:
            tl.store(dx_ptr + out, (dt * scale).to(dx_ptr.dtype.element_ty), mask=m)
        if SIGMA_GRAD:
            tl.store(dsigma_ptr + out, (dsig * scale).to(dsigma_ptr.dtype.element_ty), mask=m)
    rec = tl.sum(acc, axis=1)

    kacc = tl.zeros([BLOCK_M, BLOCK_L], dtype=tl.float32)
    eacc = tl.zeros([BLOCK_M, BLOCK_L], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        m = row_ok[:, None] & (cols < L)[None, :]
        mu = tl.load(mu_ptr + rows[:, None] * stride_mb + cols[None, :] * stride_ml,
                     mask=m, other=0).to(tl.float32)
        lv = tl.load(logvar_ptr + rows[:, None] * stride_vb + cols[None, :] * stride_vl,
                     mask=m, other=0).to(tl.float32)
        kl, kl_eff, dmu, dlv = _latent_terms(mu, lv, act_ptr, cols[None, :], m, free_bits, FREE_BITS)
        kacc += kl
        eacc += kl_eff
        if GRAD:
            out = rows[:, None] * L + cols[None, :]
            tl.store(dmu_ptr + out, (dmu * scale).to(dmu_ptr.dtype.element_ty), mask=m)
            tl.store(dlogvar_ptr + out, (dlv * scale).to(dlogvar_ptr.dtype.element_ty), mask=m)
    kl = tl.sum(kacc, axis=1)
    kl_eff = tl.sum(eacc, axis=1)

    if PARTIAL:
        pid = tl.program_id(0)
        tl.store(partial_ptr + pid, tl.sum(tl.where(row_ok, rec, 0.0), axis=0))
        tl.store(partial_ptr + programs + pid, tl.sum(tl.where(row_ok, kl, 0.0), axis=0))
        tl.store(partial_ptr + 2 * programs + pid, tl.sum(tl.where(row_ok, kl_eff, 0.0), axis=0))
        _totals(partial_ptr, counter_ptr, out_ptr, programs, beta, scale, TERMS, SUM_BLOCK)
    else:
        # loss_i = rec_i + beta kl_eff_i, per row: out [4, B]
        beta = tl.cast(beta, tl.float32)
        tl.store(out_ptr + rows, rec + beta * kl_eff, mask=row_ok)
        tl.store(out_ptr + B + rows, rec, mask=row_ok)
        tl.store(out_ptr + 2 * B + rows, kl, mask=row_ok)
        tl.store(out_ptr + 3 * B + rows, kl_eff, mask=row_ok)


# ---- backward: multiply the gradients written by the forward by their factors ---------------------

@triton.jit
def _row_g(g_ptr, stride_gc, stride_gb, rows, m, C: tl.constexpr, TERMS: tl.constexpr):
    # grad_output of output component C for the given rows (stride_gb = 0: one scalar). Without
    # TERMS the op's output is the loss alone: the components' grad_outputs are 0
    if C == 0 or TERMS:
        g = tl.load(g_ptr + C * stride_gc + rows * stride_gb, mask=m, other=0.0).to(tl.float32)
    else:
        g = tl.zeros(rows.shape, dtype=tl.float32)
    return g


@triton.jit
def _must_scale(f):
    # a tile whose factors are all exactly 1 is left untouched (NaN != 1: it is scaled)
    return tl.sum(tl.ravel((f != 1.0).to(tl.int32)), axis=0) != 0


@triton.jit
def _scale_grads_kernel(
    g_ptr, stride_gc, stride_gb, act_ptr,
    a_ptr, b_ptr, c_ptr, d_ptr, e_ptr,
    n_pix, B, N, L, pix_tiles, lat_tiles, beta,
    HAS_B: tl.constexpr, HAS_C: tl.constexpr, FREE_BITS: tl.constexpr, PER_ROW: tl.constexpr,
    TERMS: tl.constexpr, BLOCK: tl.constexpr, LAT_ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # In place, for the forward's contiguous gradients and g, the grad_output of the op's output
    # (loss, reconstruction, kl, kl_eff) per row (or one scalar each, stride_gb = 0; or the loss's
    # alone without TERMS):
    #   pixel buffers a, b, c (d recon, d x, d sigma) [B, N]  *= g0 + g1
    #   latent buffers d, e (d mu, d logvar) [B, L]          *= (beta g0 + g3) active_k + g2
    # pix_tiles tiles of BLOCK pixels, then lat_tiles tiles of LAT_ROWS rows x all L dimensions;
    # the grid is persistent (each program takes every num_programs-th tile of each). A tile whose
    # factors are all 1 is left untouched, so a plain loss.backward() with beta = 1 moves no bytes.
    beta = tl.cast(beta, tl.float32)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    for tile in range(pid, pix_tiles, programs):
        offs = tl.cast(tile, tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        m = offs < n_pix
        if PER_ROW:
            rows = offs // N
            f = (_row_g(g_ptr, stride_gc, stride_gb, rows, m, 0, TERMS)
                 + _row_g(g_ptr, stride_gc, stride_gb, rows, m, 1, TERMS))
        else:  # one scalar each: no per-element gathers
            f = tl.load(g_ptr).to(tl.float32)
            if TERMS:
                f += tl.load(g_ptr + stride_gc).to(tl.float32)
        f = tl.where(m, f, 1.0)
        if _must_scale(f):
            va = tl.load(a_ptr + offs, mask=m, other=0).to(tl.float32)
            tl.store(a_ptr + offs, (va * f).to(a_ptr.dtype.element_ty), mask=m)
            if HAS_B:
                vb = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
                tl.store(b_ptr + offs, (vb * f).to(b_ptr.dtype.element_ty), mask=m)
            if HAS_C:
                vc = tl.load(c_ptr + offs, mask=m, other=0).to(tl.float32)
                tl.store(c_ptr + offs, (vc * f).to(c_ptr.dtype.element_ty), mask=m)
    for tile in range(pid, lat_tiles, programs):
        lrows = tl.cast(tile, tl.int64) * LAT_ROWS + tl.arange(0, LAT_ROWS).to(tl.int64)
        lrow_ok = lrows < B
        w = (beta * _row_g(g_ptr, stride_gc, stride_gb, lrows, lrow_ok, 0, TERMS)
             + _row_g(g_ptr, stride_gc, stride_gb, lrows, lrow_ok, 3, TERMS))
        g2 = _row_g(g_ptr, stride_gc, stride_gb, lrows, lrow_ok, 2, TERMS)
        for l0 in range(0, L, BLOCK_L):
            lcols = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
            lm = lrow_ok[:, None] & (lcols < L)[None, :]
            if FREE_BITS:
                act = tl.load(act_ptr + lcols, mask=lcols < L, other=0.0)
                lf = w[:, None] * act[None, :] + g2[:, None]
            else:
                lf = w[:, None] + g2[:, None] + tl.zeros([LAT_ROWS, BLOCK_L], dtype=tl.float32)
            lf = tl.where(lm, lf, 1.0)
            if _must_scale(lf):
                loffs = lrows[:, None] * L + lcols[None, :]
                vd = tl.load(d_ptr + loffs, mask=lm, other=0).to(tl.float32)
                tl.store(d_ptr + loffs, (vd * lf).to(d_ptr.dtype.element_ty), mask=lm)
                ve = tl.load(e_ptr + loffs, mask=lm, other=0).to(tl.float32)
                tl.store(e_ptr + loffs, (ve * lf).to(e_ptr.dtype.element_ty), mask=lm)


# ---- launchers ---------------------------------------------------------------------------------

@dataclass(slots=True)
class ELBOConfig:
    """The options of one ELBO call, carried from the launcher into the backward."""
    likelihood: str                 # "bernoulli", "gaussian" ("mse" is a Gaussian), "continuous_bernoulli"
    from_logits: bool
    reduction: str                  # "sum", "batchmean" or "none"
    inv_sigma: float = 1.0          # the Gaussian's 1 / sigma for a number sigma
    log_norm: float = 0.0           # the Gaussian's log sigma + log(2 pi) / 2 for a number sigma
    beta: float = 1.0
    free_bits: float = 0.0
    grad: bool = False              # write the gradients in the forward pass
    x_grad: bool = False            # ... d x too
    sigma_grad: bool = False        # ... d sigma too (sigma a tensor)
    terms: bool = True              # out holds (loss, reconstruction, kl, kl_eff); else the loss alone


def _row_blocks(N: int, L: int):
    # from the feature sizes only, so a changing batch size (symbolic under torch.compile)
    # reuses one kernel configuration
    block_n = min(_MAX_BLOCK_N, next_power_of_2(max(N, 1)))
    block_m = max(1, min(64, _ROW_TILE // block_n))  # capped: tiny N must not make huge tiles
    block_l = min(_MAX_BLOCK_L, next_power_of_2(max(L, 1)))
    return block_m, block_n, block_l


def active_dims(mu, logvar, free_bits: float):
    """Free bits: 1.0 for the latent dimensions whose KL, averaged over the batch, exceeds
    ``free_bits`` nats, else 0.0 (float32 [L]); computed in fp32 in a fixed order."""
    m, v = mu.float(), logvar.float()
    kl = 0.5 * (m * m + torch.exp(v) - 1.0 - v)
    return (kl.mean(0) > free_bits).float()


_MADE = ("partial_ptr", "counter_ptr", "out_ptr", "drecon_ptr", "dx_ptr", "dmu_ptr", "dlogvar_ptr")
_SCALE_MADE = ("act_ptr", "a_ptr", "b_ptr", "c_ptr", "d_ptr", "e_ptr")


@functools.lru_cache(maxsize=256)
def _flat_static(B: int, N: int, L: int, code: int, x_u8: bool, grad: bool, x_grad: bool, terms: bool):
    # (programs, the flat kernel's arguments fixed by the shapes and options)
    # the heavier likelihoods (probabilities, continuous Bernoulli) hold 4 elements per thread and
    # stream instead of 8, to stay at or above 50% occupancy
    block = _FLAT_BLOCK // 2 if code == BERNOULLI_PROBS or code == CONT_BERNOULLI else _FLAT_BLOCK
    per_program = _FLAT_BLOCK * _FLAT_ITERS
    pix_programs = cdiv(B * N, per_program)
    programs = pix_programs + cdiv(B * L, per_program)
    return programs, Static(n_pix=B * N, n_lat=B * L, pix_programs=pix_programs, programs=programs,
                            LIKELIHOOD=code, X_U8=x_u8, GRAD=grad, X_GRAD=x_grad, TERMS=terms, BLOCK=block,
                            ITERS=per_program // block, SUM_BLOCK=_SUM_BLOCK, num_warps=_FLAT_WARPS)


def elbo_forward(kernel_launch, recon, x, mu, logvar, sigma, cfg: ELBOConfig, scratch):
    """(out, d recon, d x, d sigma, d mu, d logvar, active) for 2-D ``recon``/``x`` [B, N],
    ``mu``/``logvar`` [B, L] and ``sigma`` None or [B, N] (the Gaussian's per-element sigma).

    ``out`` is float32: (loss, reconstruction, kl, kl_eff) [4] for "sum"/"batchmean" (the loss
    alone, 0-dim, without ``cfg.terms``), [4, B] for "none". With ``cfg.grad`` the gradients of
    the reconstruction (d recon, d x, d sigma) and of the unweighted KL (d mu, d logvar), times
    d loss / d row (1, or 1/B), are written in the same pass, contiguous in their input's dtype
    (d x only with ``cfg.x_grad``, d sigma with ``cfg.sigma_grad``); otherwise they are None.
    ``active`` is the free-bits mask [L] (None without free bits). ``scratch(device, floats)``
    gives the partial sums' buffer and the zeroed int32 counter of the last-program reduction
    (``launch.fresh_scratch`` or ``launch.stream_scratch``). ``kernel_launch`` wraps a kernel for
    launching (``wrap_triton`` inside a ``triton_op``, or a direct launcher).
    """
    B, N = recon.shape
    L = mu.shape[1]
    dev = recon.device
    grad = cfg.grad
    x_grad = grad and cfg.x_grad
    sigma_grad = grad and cfg.sigma_grad and sigma is not None
    free_bits = cfg.free_bits > 0
    per_row = cfg.reduction == "none"
    dense = torch.contiguous_format
    drecon = torch.empty_like(recon, memory_format=dense) if grad else None
    dx = torch.empty_like(x, memory_format=dense) if x_grad else None
    dsigma = torch.empty_like(sigma, memory_format=dense) if sigma_grad else None
    dmu = torch.empty_like(mu, memory_format=dense) if grad else None
    dlogvar = torch.empty_like(logvar, memory_format=dense) if grad else None
    act = active_dims(mu, logvar, cfg.free_bits) if free_bits else None
    terms = cfg.terms or per_row
    out = torch.empty((4, B) if per_row else (4,) if terms else (), device=dev, dtype=torch.float32)
    code = likelihood_code(cfg.likelihood, cfg.from_logits)
    # a tensor that is never written stands in for a buffer that is not asked for
    tensors = dict(recon_ptr=recon, x_ptr=x, mu_ptr=mu, logvar_ptr=logvar, out_ptr=out,
                   drecon_ptr=drecon if grad else recon, dx_ptr=dx if x_grad else recon,
                   dmu_ptr=dmu if grad else mu, dlogvar_ptr=dlogvar if grad else logvar)
    scalars = dict(inv_sigma=float(cfg.inv_sigma), log_norm=float(cfg.log_norm), beta=float(cfg.beta),
                   scale=1.0 / B if cfg.reduction == "batchmean" else 1.0)

    # the flat tiling has no free bits (its latent partial sums are whole-batch sums of the KL)
    if (not per_row and sigma is None and not free_bits and recon.is_contiguous() and x.is_contiguous()
            and mu.is_contiguous() and logvar.is_contiguous()):
        programs, static = _flat_static(B, N, L, code, x.dtype == torch.uint8, grad, x_grad, terms)
        partial, counter = scratch(dev, 3 * programs)
        # the buffers made here need no checks: their dtypes follow recon's, x's, mu's, logvar's
        launch(kernel_launch, _elbo_flat_kernel, (programs,), static, made=_MADE, partial_ptr=partial,
               counter_ptr=counter, **tensors, **scalars)
        return out, drecon, dx, dsigma, dmu, dlogvar, act

    block_m, block_n, block_l = _row_blocks(N, L)
    programs = cdiv(B, block_m)
    # per row: no reduction, out stands in for the partial sums and the counter
    partial, counter = (out, out) if per_row else scratch(dev, 3 * programs)
    sigma_t = sigma if sigma is not None else recon
    kernel_launch(_elbo_rows_kernel)[(programs,)](
        sigma_ptr=sigma_t, act_ptr=act if free_bits else mu, dsigma_ptr=dsigma if sigma_grad else recon,
        partial_ptr=partial, counter_ptr=counter, B=B, N=N, L=L, programs=programs,
        stride_rb=recon.stride(0), stride_rn=recon.stride(1), stride_xb=x.stride(0), stride_xn=x.stride(1),
        stride_sb=sigma_t.stride(0), stride_sn=sigma_t.stride(1),
        stride_mb=mu.stride(0), stride_ml=mu.stride(1), stride_vb=logvar.stride(0),
        stride_vl=logvar.stride(1), free_bits=float(cfg.free_bits), LIKELIHOOD=code,
        X_U8=x.dtype == torch.uint8, GRAD=grad, X_GRAD=x_grad, SIGMA_PTR=sigma is not None,
        SIGMA_GRAD=sigma_grad, FREE_BITS=free_bits, PARTIAL=not per_row, TERMS=terms, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_L=block_l, SUM_BLOCK=_SUM_BLOCK, num_warps=_FLAT_WARPS, **tensors, **scalars)
    return out, drecon, dx, dsigma, dmu, dlogvar, act


@functools.lru_cache(maxsize=256)
def _scale_static(B: int, N: int, L: int, max_programs: int, has_b: bool, has_c: bool, free_bits: bool,
                  dims: int, stride_gc: int, stride_gb: int, dtypes: tuple):
    # (programs, the scaling kernel's arguments fixed by the shapes, options and the dtypes of the
    # forward's buffers)
    pix_tiles = cdiv(B * N, _FLAT_BLOCK)
    block_l = min(_MAX_BLOCK_L, next_power_of_2(max(L, 1)))
    lat_rows = _LAT_TILE // block_l
    lat_tiles = cdiv(B, lat_rows)
    programs = min(max(pix_tiles, lat_tiles), max_programs)
    return programs, Static(stride_gc=stride_gc, stride_gb=stride_gb, n_pix=B * N, B=B, N=N, L=L,
                            pix_tiles=pix_tiles, lat_tiles=lat_tiles, HAS_B=has_b, HAS_C=has_c,
                            FREE_BITS=free_bits, PER_ROW=dims == 2, TERMS=dims > 0, BLOCK=_FLAT_BLOCK,
                            LAT_ROWS=lat_rows, BLOCK_L=block_l, num_warps=_FLAT_WARPS)


def scale_grads_(kernel_launch, grad, beta: float, drecon, dx, dsigma, dmu, dlogvar, act,
                 max_programs: int) -> None:
    """Multiply the forward's gradient buffers in place by their factors (see the kernel), for
    ``grad`` the grad_output of the op's output: the loss's alone (0-dim), [4], or [4, B] per row.
    ``dx``/``dsigma`` may be None or empty (not asked for), ``act`` too (no free bits). The grid is
    at most ``max_programs`` programs (a few per SM), each walking its share of the tiles; where
    every factor is 1 they only read ``grad``."""
    B, N = drecon.shape
    has_b = dx is not None and dx.numel() > 0
    has_c = dsigma is not None and dsigma.numel() > 0
    free_bits = act is not None and act.numel() > 0
    dims = grad.dim()
    b = dx if has_b else drecon  # b, c and act: a buffer that is never touched stands in for one not asked for
    c = dsigma if has_c else drecon
    programs, static = _scale_static(B, N, dmu.shape[1], max_programs, has_b, has_c, free_bits, dims,
                                     grad.stride(0) if dims else 0, grad.stride(1) if dims == 2 else 0,
                                     (drecon.dtype, b.dtype, c.dtype, dmu.dtype, dlogvar.dtype))
    # the forward made the buffers, with the dtypes the Static was made for: only g is checked
    launch(kernel_launch, _scale_grads_kernel, (programs,), static, made=_SCALE_MADE, g_ptr=grad,
           act_ptr=act if free_bits else dmu, a_ptr=drecon, b_ptr=b, c_ptr=c, d_ptr=dmu, e_ptr=dlogvar,
           beta=float(beta))
