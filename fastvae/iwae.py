"""Importance-weighted bounds (Burda et al., 2016) without the [K, B, D] decoder outputs.

The K-sample bound of log p(x) for a Gaussian encoder q(z|x) = N(mu, diag(exp(logvar))), a
standard normal prior and a decoder whose last layer is linear (logits ``l = W h + b``, W [D, H],
``h = decoder_hidden(z)`` [H]) with a Bernoulli likelihood:

    log w_k = log p(x | z_k) + log p(z_k) - log q(z_k | x),        z_k = mu + exp(logvar / 2) eps_k
    log p(x | z) = sum_j x_j l_j - softplus(l_j)
    log p(z) - log q(z | x) = sum_l (eps_l^2 + logvar_l - z_l^2) / 2     (the log 2 pi terms cancel)
    bound = logsumexp_k(log w_k) - log K

computed in chunks of samples and images:

* **Running log-sum-exp over K.** Each chunk of k samples updates a running maximum ``m`` and sum
  ``s = sum exp(log w - m)`` per image (float64), so memory does not depend on K.
* **x.l without per-logit work.** ``sum_j x_j l_j = (W^T x) . h + b . x``: ``W^T x`` [H] and ``b . x``
  are computed once per image and shared by its K samples (a dot product of length H per sample).
* **softplus without softplus or log1p** (their AVX-512 kernels are ~10x slower than exp/log on
  some CPUs): with ``e = exp(-|l|)`` and ``u = fl(1 + e)``, ``softplus(l) = relu(l) + log(u)`` to
  2^-24 nats per pixel, and ``sum_j log(u_j)`` is the log of products of groups of up to 120
  columns (:func:`_sum_log_fp32`), so a chunk costs one log per group, not per element.
* **Cache-sized chunks.** Each chunk's logits [r, D] (r = samples x images) stay in cache:
  written by one matmul, read by the passes above, then reused by the next chunk.

On CUDA (``backend="triton"``) the logits are never written at all: the fused kernel of
:mod:`fastvae.kernels.fused_decoder` makes them tile by tile and returns log p(x | z) per row.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _backend
from ._fallback import _sum_log, _threads
from .functional import REDUCTIONS, check_count, reparameterize

# Decoder-output elements per chunk and torch thread (fp32 logits: 512 KB, L2-sized)
_CHUNK_ELEMENTS = 1 << 17


def _check_tensor(name: str, t, dims: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def _check_decoder_inputs(x: Tensor, mu: Tensor, logvar: Tensor, weight: Tensor,
                          bias: Optional[Tensor], eps: Optional[Tensor], K: int) -> None:
    _check_tensor("mu", mu, 2)
    _check_tensor("logvar", logvar, 2)
    _check_tensor("weight", weight, 2)
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.dtype == torch.uint8):
        raise TypeError("x must be a floating-point tensor (or uint8 pixels read as x/255)")
    N = mu.shape[0]
    D = weight.shape[0]
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape [N, L]; got {tuple(mu.shape)} and "
                         f"{tuple(logvar.shape)}")
    if x.dim() < 1 or x.shape[0] != N or x.numel() != N * D:
        raise ValueError(f"x must be [N, ...] with N = mu.shape[0] = {N} and weight.shape[0] = {D} "
                         f"elements per image; got x {tuple(x.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != D:
            raise ValueError(f"bias must be [D] = [{D}] (weight is [D, H]); got {tuple(bias.shape)}")
    if eps is not None:
        _check_tensor("eps", eps, 3)
        if eps.shape != (K, *mu.shape):
            raise ValueError(f"eps must be [num_samples, N, L] = {(K, *mu.shape)}; got {tuple(eps.shape)}")
    devices = {t.device for t in (x, mu, logvar, weight, bias, eps) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")
    if N == 0:
        raise ValueError("need at least one image")


def chunk_shape(num_images: int, num_samples: int, width: int, chunk_rows: Optional[int] = None) -> tuple[int, int]:
    """(images per chunk, samples per chunk) for decoder outputs of ``width`` elements: about
    ``_CHUNK_ELEMENTS`` (or ``chunk_rows`` rows), samples first."""
    rows = chunk_rows if chunk_rows is not None else max(1, _CHUNK_ELEMENTS // max(width, 1))
    k = max(1, min(num_samples, rows))
    b = max(1, min(num_images, rows // k))
    return b, k


def _product_group(D: int) -> int:
    """The largest divisor of D that is at most 120 (0 if it is below 16): a product of that many
    values in [1, 2] stays below fp32's 2^128."""
    g = next(g for g in range(min(D, 120), 0, -1) if D % g == 0)
    return g if g >= 16 or g == D else 0


def _sum_log_fp32(u: Tensor) -> Tensor:
    """Per-row ``sum(log(u))`` for u [r, D] in [1, 2]: fp32 products of groups of columns (one
    multiply per element, in place of a conversion to float64 and a product; the rounding error,
    about group x 2^-24 relative per product, is < 1e-5 nats per row for D = 784), then a log per
    group. Float64 products (:func:`fastvae._fallback._sum_log`) where D has no suitable divisor or u
    is float64."""
    r, D = u.shape
    g = _product_group(D)
    if u.dtype != torch.float32 or not g or not u.is_contiguous():
        return _sum_log(u)
    return torch.prod(u.view(r, D // g, g), 2).log_().sum(1, dtype=torch.float64)


def bernoulli_log_px_rows(h: Tensor, weight: Tensor, bias: Optional[Tensor], xw: Tensor, xb: Tensor,
                          buf: Optional[list] = None) -> Tensor:
    """log p(x | z) per row of h [b, k, H] for each image's b rows of targets: float64 [b, k].

    ``xw`` [b, H] = x @ weight and ``xb`` [b] = x . bias (zero without bias) are the per-image parts
    of ``sum_j x_j l_j``; ``buf`` holds two scratch tensors of at least [b * k, D].
    """
    b, k, H = h.shape
    D = weight.shape[0]
    r = b * k
    h2 = h.reshape(r, H)
    if buf is None:
        buf = [torch.empty(r, D, dtype=h.dtype, device=h.device) for _ in range(2)]
    l_buf, a_buf = buf[0].view(-1)[: r * D].view(r, D), buf[1].view(-1)[: r * D].view(r, D)
    logits = (torch.addmm(bias, h2, weight.t(), out=l_buf) if bias is not None
              else torch.mm(h2, weight.t(), out=l_buf))
    # x . l = (W^T x) . h + b . x: a length-H dot product per row
    xl = torch.bmm(h, xw.unsqueeze(2)).view(b, k).double().add_(xb.double().unsqueeze(1))
    relu = torch.clamp(logits, min=0.0, out=a_buf).sum(1)
    e = torch.abs(logits, out=a_buf).neg_().exp_()      # e = exp(-|l|) in (0, 1]
    u = e.add_(1.0)                                      # u = fl(1 + e) in [1, 2]
    # sum log(u) as the log of products; log(fl(1 + e)) is log1p(e) to 2^-24 absolute per pixel
    # (<= 4.7e-5 nats for D = 784, the size of the fp32 rounding of the row sums themselves), so
    # the bound needs no rounding-error correction
    sp = _sum_log_fp32(u).add_(relu)
    return xl.sub_(sp.view(b, k))


@torch.no_grad()
def iw_log_likelihood(x: Tensor, mu: Tensor, logvar: Tensor, decoder_hidden: Callable[[Tensor], Tensor],
                      weight: Tensor, bias: Optional[Tensor] = None, *, num_samples: int,
                      eps: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                      chunk_rows: Optional[int] = None, progress: Optional[Callable[[int], None]] = None,
                      backend: str = "auto", threads: Optional[int] = None) -> Tensor:
    """Per-image importance-weighted bound of log p(x) in nats with K = ``num_samples``: float64 [N].

    Args:
        x: targets [N, ...] with D elements per image, in [0, 1] (or uint8 pixels read as x/255).
        mu, logvar: the encoder's q(z | x) for each image, [N, L].
        decoder_hidden: the decoder up to its output layer, z [r, L] -> h [r, H] (e.g.
            ``lambda z: relu(fc3(z))``); called on chunks of samples.
        weight, bias: the decoder's output layer, [D, H] and [D] (``nn.Linear``'s layout); its
            outputs are Bernoulli logits.
        num_samples: K >= 1.
        eps: optional noise [K, N, L] (z_k = mu + exp(logvar / 2) eps[k]), for tests; by default
            drawn chunk by chunk from ``generator``.
        chunk_rows: samples x images per chunk (default on CPU: cache-sized, 2^17 decoder
            outputs; on the Triton path 2^24, as no logits are stored).
        progress: called with the number of images finished after each group of images (from
            worker threads on CPU).
        backend: "auto", "triton" or "torch" for the output layer + likelihood (see ``fastvae``).
        threads: CPU worker threads, each on its own groups of images (default
            ``torch.get_num_threads()``); torch's intra-op threads are set to 1 meanwhile.

    The drawn noise is reproducible from ``generator`` and does not depend on ``threads``.

    Memory is independent of K: one chunk of logits (none on the Triton path) and a running
    log-sum-exp per image.
    """
    K = check_count("num_samples", num_samples)
    _check_decoder_inputs(x, mu, logvar, weight, bias, eps, K)
    if not callable(decoder_hidden):
        raise TypeError(f"decoder_hidden must be callable (z -> h), got {type(decoder_hidden).__name__}")
    N, L = mu.shape
    D, H = weight.shape
    dev = mu.device
    use_triton = _backend.resolve(backend, weight, mu) == "triton"
    dt = weight.dtype
    xs = x.reshape(N, D)
    xs = xs.to(dt).mul_(1.0 / 255.0) if xs.dtype == torch.uint8 else xs.to(dt)
    m32, v32 = mu.to(dt), logvar.to(dt)
    std = torch.exp(0.5 * v32)
    cpu = dev.type == "cpu" and not use_triton
    if chunk_rows is None:   # CPU: one thread's cache-sized chunk; GPU: no logits, large chunks
        chunk_rows = max(1, (_CHUNK_ELEMENTS if cpu else 1 << 24) // D)
    b_chunk, k_chunk = chunk_shape(N, K, D, chunk_rows)
    groups = list(range(0, N, b_chunk))
    workers = max(1, min(torch.get_num_threads() if threads is None else threads, len(groups))) if cpu else 1
    # CPU noise: one generator per group of images, seeded by one draw of ``generator`` plus the
    # group's first image, so the result does not depend on the number of worker threads
    base_seed = (int(torch.randint(0, 2**62, (1,), generator=generator).item())
                 if cpu and eps is None else None)
    out = torch.empty(N, dtype=torch.float64, device=dev)

    def group(i0: int, buf) -> None:
        b = min(b_chunk, N - i0)
        xi, mi, vi, si = xs[i0:i0 + b], m32[i0:i0 + b], v32[i0:i0 + b], std[i0:i0 + b]
        gen = generator if base_seed is None else torch.Generator().manual_seed(base_seed + i0)
        if not use_triton:
            xw = xi @ weight                                      # [b, H]: W^T x, once per image
            xb = xi @ bias if bias is not None else torch.zeros(b, dtype=dt, device=dev)
        for k0 in range(0, K, k_chunk):
            k = min(k_chunk, K - k0)
            if eps is not None:
                e = eps[k0:k0 + k, i0:i0 + b].to(dt).transpose(0, 1)      # [b, k, L]: image-major
                z = torch.addcmul(mi.unsqueeze(1), si.unsqueeze(1), e)
            elif use_triton:  # z drawn in the reparameterisation kernel; eps only for log q
                z = reparameterize(mi, vi, num_samples=k, generator=gen, backend="triton").transpose(0, 1)
                e = (z - mi.unsqueeze(1)) / si.unsqueeze(1)
            else:
                e = torch.randn(k, b, L, dtype=dt, device=dev, generator=gen).transpose(0, 1)
                z = torch.addcmul(mi.unsqueeze(1), si.unsqueeze(1), e)
            # log p(z) - log q(z | x), per sample
            lw = (e.square() - z.square()).sum(2).double().add_(vi.sum(1).double().unsqueeze(1)).mul_(0.5)
            h = decoder_hidden(z.reshape(b * k, L)).reshape(b, k, H)
            if use_triton:   # the fused kernel: no logits in memory
                lw += torch.ops.fastvae.decoder_log_px(h.reshape(b * k, H), weight, bias, xi, k,
                                                       "bernoulli", 1.0).view(b, k)
            else:
                lw += bernoulli_log_px_rows(h, weight, bias, xw, xb, buf)
            # running log-sum-exp over the samples
            cm = lw.max(1).values
            if k0 == 0:
                run_max, run_sum = cm, torch.exp(lw - cm.unsqueeze(1)).sum(1)
            else:
                new_max = torch.maximum(run_max, cm)
                run_sum.mul_(torch.exp(run_max - new_max)).add_(torch.exp(lw - new_max.unsqueeze(1)).sum(1))
                run_max = new_max
        out[i0:i0 + b] = run_max + torch.log(run_sum) - math.log(K)
        if progress is not None:
            progress(b)

    def worker(w: int) -> None:
        buf = None if use_triton else [torch.empty(b_chunk * k_chunk, D, dtype=dt, device=dev) for _ in range(2)]
        with torch.no_grad():  # grad mode is per thread
            for i0 in groups[w::workers]:
                group(i0, buf)

    if workers == 1:
        worker(0)
        return out
    # several CPU threads, each on its own groups of images with single-threaded ops: no barrier
    # per op between threads (chunks are cache-sized: ~20 small ops each), which a loaded machine
    # would stall on. torch's intra-op thread count is set to 1 meanwhile (process-wide) and restored.
    from concurrent.futures import ThreadPoolExecutor

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(worker, w) for w in range(workers)]:
                f.result()
    finally:
        torch.set_num_threads(saved)
    return out


# ---- the K-sample bound as a training loss --------------------------------------------------------

def _row_chunk_samples(K: int, B: int, D: int, device: torch.device) -> int:
    """Samples per chunk for sample-major rows [K, B]: whole samples (multiples of B rows) with
    about ``_CHUNK_ELEMENTS`` decoder outputs per torch thread on CPU (2^22 on GPU)."""
    budget = (1 << 22) if device.type == "cuda" else _CHUNK_ELEMENTS * _threads()
    return max(1, min(K, budget // max(B * D, 1)))


def _targets(x: Tensor, B: int, D: int, dtype: torch.dtype) -> Tensor:
    t = x.reshape(B, D)
    return t.to(dtype).mul_(1.0 / 255.0) if t.dtype == torch.uint8 else t.to(dtype)


class _DecoderLogPx(torch.autograd.Function):
    """log p(x | z) [K, B] of the output layer ``l = W h + b`` with a Bernoulli likelihood, for
    sample-major h [K, B, H] and targets x [B, D]; forward and backward chunk by chunk (no
    [K * B, D] tensor): the gradients are, with ``d = g (x - sigmoid(l))`` per chunk,
    ``grad h = d W``, ``grad W = sum_chunks d^T h``, ``grad b = sum_chunks sum_rows d``."""

    @staticmethod
    def forward(ctx, h, weight, bias, x, use_triton: bool):
        K, B, H = h.shape
        D = weight.shape[0]
        ctx.use_triton = use_triton
        ctx.save_for_backward(h, weight, bias, x)
        if use_triton:
            return torch.ops.fastvae.decoder_log_px(h.reshape(K * B, H), weight, bias, x, 1,
                                                    "bernoulli", 1.0).view(K, B)
        xw = x @ weight.to(x.dtype)                                     # [B, H]: W^T x per image
        xb = x @ bias.to(x.dtype) if bias is not None else torch.zeros(B, dtype=x.dtype, device=x.device)
        kc = _row_chunk_samples(K, B, D, h.device)
        buf = [torch.empty(kc * B, D, dtype=h.dtype, device=h.device) for _ in range(2)]
        out = torch.empty(K, B, dtype=torch.float64, device=h.device)
        for k0 in range(0, K, kc):
            hc = h[k0:k0 + kc].transpose(0, 1)                         # [B, kc, H] image-major
            out[k0:k0 + kc] = bernoulli_log_px_rows(hc, weight, bias, xw, xb, buf).t()
        return out.to(torch.float32 if h.dtype != torch.float64 else torch.float64)

    @staticmethod
    def backward(ctx, g):
        h, weight, bias, x = ctx.saved_tensors
        K, B, H = h.shape
        D = weight.shape[0]
        dt = torch.float64 if h.dtype == torch.float64 else torch.float32
        w = weight.to(dt)
        gh = torch.empty(K, B, H, dtype=dt, device=h.device) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(D, H, dtype=dt, device=h.device) if ctx.needs_input_grad[1] else None
        gb = torch.zeros(D, dtype=dt, device=h.device) if bias is not None and ctx.needs_input_grad[2] else None
        kc = _row_chunk_samples(K, B, D, h.device)
        g = g.to(dt)
        for k0 in range(0, K, kc):
            hc = h[k0:k0 + kc].reshape(-1, H)                          # [kc * B, H]
            gc = g[k0:k0 + kc].reshape(-1)
            if ctx.use_triton:   # -d (g * d nll / dl), the logits recomputed tile by tile
                d = torch.ops.fastvae.decoder_dlogits(hc, weight, bias, x, gc, 1, "bernoulli", 1.0).neg_()
            else:                # g (x - sigmoid(l)), the chunk's logits recomputed
                lc = torch.addmm(bias.to(dt), hc.to(dt), w.t()) if bias is not None else hc.to(dt) @ w.t()
                d = torch.sigmoid_(lc).view(-1, B, D).neg_().add_(x.to(dt)).mul_(gc.view(-1, B, 1)).view(-1, D)
            if gh is not None:
                torch.mm(d, w, out=gh[k0:k0 + kc].view(-1, H))
            if gw is not None:
                gw.addmm_(d.t(), hc.to(dt))
            if gb is not None:
                gb += d.sum(0)
        return (None if gh is None else gh.to(h.dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(bias.dtype), None, None)


def iwae_loss(h: Tensor, weight: Tensor, bias: Optional[Tensor], x: Tensor, z: Tensor, mu: Tensor,
              logvar: Tensor, *, reduction: str = "sum", backend: str = "auto") -> Tensor:
    """The negative K-sample importance-weighted bound (Burda et al., 2016) as a training loss.

    Per image i: ``-(logsumexp_k log w_ki - log K)`` with
    ``log w_ki = log p(x_i | z_ki) + log N(z_ki; 0, I) - log N(z_ki; mu_i, exp(logvar_i))``,
    a Bernoulli decoder whose output layer ``logits = h W^T + b`` is fused with its likelihood:
    the [K, B, D] logits are never materialised, in the forward or the backward (chunk by chunk on
    CPU; tile by tile in the Triton kernels on CUDA).

    Args:
        h: [K, B, H] the decoder's last hidden activations for the samples ``z`` (e.g.
            ``relu(fc3(z))``), differentiable.
        weight, bias: the decoder's output layer, [D, H] and [D] or None (``nn.Linear``'s layout).
        x: targets [B, ...] with D elements per image: floats in [0, 1] or uint8 pixels (x / 255);
            they get no gradient.
        z: [K, B, L] the samples, e.g. ``fastvae.reparameterize(mu, logvar, num_samples=K)``.
        mu, logvar: [B, L] the encoder's q(z | x), or shapes that broadcast to [B, L] (a logvar
            [L] shared by the batch, as ``fastvae.reparameterize`` takes it).
        reduction: "sum" over the batch, "batchmean" (sum / B) or "none" ([B]).
        backend: "auto", "triton" or "torch" for the fused output layer.

    Returns:
        the loss in float32 (float64 for float64 inputs); gradients flow to h, weight, bias, z, mu
        and logvar (through z too, the reparameterisation path).
    """
    for name, t in (("h", h), ("weight", weight), ("z", z), ("mu", mu), ("logvar", logvar)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if reduction not in REDUCTIONS:
        hint = " ('batchmean' is the mean over the batch of the per-image losses)" if reduction == "mean" else ""
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}{hint}")
    if h.dim() != 3 or z.dim() != 3 or h.shape[:2] != z.shape[:2]:
        raise ValueError(f"h and z must be [K, B, H] and [K, B, L] with the same K and B; got h "
                         f"{tuple(h.shape)}, z {tuple(z.shape)}")
    K, B, H = h.shape
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be [D, H] with H = h.shape[-1] = {H}; got {tuple(weight.shape)}")
    D = weight.shape[0]
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (D,)):
        raise ValueError(f"bias must be None or a [D] = [{D}] tensor")
    want = torch.Size((B, z.shape[2]))
    try:  # [B, L], or shapes that broadcast to it (as fastvae.reparameterize takes them)
        ok = mu.dim() <= 2 and logvar.dim() <= 2 and torch.broadcast_shapes(want, mu.shape, logvar.shape) == want
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mu and logvar must be [B, L] = {tuple(want)} or broadcast to it (e.g. a logvar "
                         f"[L] shared by the batch); got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] != B or x.numel() != B * D:
        raise ValueError(f"x must be [B, ...] with B = {B} and D = {D} elements per image; got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if K == 0 or B == 0:
        raise ValueError("iwae_loss needs at least one sample and one image")
    devices = {t.device for t in (h, weight, bias, x, z, mu, logvar) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")
    # the checks of elbo_loss: x as floats or uint8 pixels (an int64 x is not x / 255)
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise TypeError(f"x must be floating point, or uint8 pixel intensities read as x/255; got {x.dtype}")
    # the output layer h W^T + b is one matmul: one dtype on both backends (torch's matmul refuses
    # a mix, the Triton kernel would compute one)
    if weight.dtype != h.dtype or (bias is not None and bias.dtype != h.dtype):
        got = f"h {h.dtype}, weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        raise TypeError(f"h, weight and bias must share one dtype (the output layer's matmul); got {got}: "
                        "cast them to one, e.g. weight.to(h.dtype)")
    use_triton = _backend.resolve(backend, h, weight, z) == "triton"
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    t = _targets(x.detach(), B, D, dt)
    log_px = _DecoderLogPx.apply(h, weight, bias, t, use_triton)          # [K, B]
    zf, mf, vf = z.to(dt), mu.to(dt), logvar.to(dt)
    # log p(z) - log q(z | x) = sum(-z^2/2 + (z - mu)^2 / (2 sigma^2) + logvar / 2); log 2 pi cancels
    log_pq = (0.5 * ((zf - mf).square() * torch.exp(-vf) - zf.square() + vf)).sum(-1)
    rows = -(torch.logsumexp(log_px.to(dt) + log_pq, 0) - math.log(K))  # [B]
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / B
    return rows
