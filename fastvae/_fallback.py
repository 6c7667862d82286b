"""The PyTorch implementation of fastvae's ops (CPU, float64, and wherever Triton is absent).

On CPU in float32, the Bernoulli on logits, the continuous Bernoulli and the Gaussian with a number
sigma run as one fused loop over the batch (``fastvae/_cpu_loops.py``: LLVM-compiled at first use,
each row read once, the row sums and d recon written together, the same math as below);
:func:`_cpu_loops.takes` says when. Everything else (float64, half inputs, other
strides, ``torch.compile`` tracing, ``FASTVAE_CPU_LOOPS=0``, no llvmlite) runs the ATen formulation
below, written for speed on every x86 CPU, whatever ATen's dispatch level (AVX2 or AVX-512), with
plain torch ops only (no compile step, no C++ toolchain):

* **No ``softplus``/``log1p`` on the hot path.** ATen's AVX-512 kernels for them cost about ten
  times its AVX2 ones, while ``exp``, ``log`` and ``sigmoid`` are fast at both levels. With
  ``e = exp(-|s|)`` and ``u = fl(1 + e)``::

      softplus(s) - s*t = [relu(s) - s*t] + log1p(e),   log1p(e) = log(u) + (e - (u - 1))

  ``e - (u - 1)`` is the exact rounding error of ``1 + e`` (both subtractions are exact), and
  dropping the ``1/u`` of the textbook correction costs at most ``2**-24 * e`` absolute, below
  1e-7 relative to ``log1p(e)``. ``sum(log(u))`` over a row is the log of a float64 product
  (no log per element); the correction and ``relu(s) - s*t`` (>= 0) share one fp32 row sum,
  added to it. (Bernoulli on
  probabilities keeps ``F.binary_cross_entropy``'s ``log1p``; the continuous Bernoulli's
  log-normaliser needs only ``exp``, ``log`` and ``reciprocal``.)
* **No cancellation at confident logits.** ``relu(s) - s*t`` is formed per element (exactly 0 for
  s = 15, t = 1) before summing, instead of ``softplus(s).sum() - s.t`` over a row, which came out
  0.0 for a row whose loss is 2.4e-4.
* **One pass over memory.** When a gradient will be needed (grad mode on, an input requires grad),
  the forward also writes d recon (and d x, d sigma) for ``grad_output = 1`` while each row chunk
  is in cache, into buffers the op owns. The backward hands them over untouched when the
  reconstruction's grad_output ``g0 + g1`` is 1 (checked on the host, only for CPU tensors) and
  otherwise scales them in place (per row for ``reduction="none"``); d mu and d logvar ([B, L],
  small) are formed in the backward from the four terms' grad_outputs. A later backward of the
  same graph (``retain_graph=True``), ``create_graph=True`` (double backward works) and
  ``torch.compile`` tracing recompute the gradients from the saved inputs with the same
  arithmetic: the same bits as the single pass.
* **No page fault per 4 KB.** A fresh buffer faults each 4 KB page in on first write (50,177 faults
  for d recon at B = 65536, most of the call's time); the buffers the op owns and fills (d recon,
  d x, d sigma, the KL's ``h``) are advised for 2 MB pages from 4 MB up (``fastvae/_memory.py``;
  ``FASTVAE_HUGE_PAGES=0`` turns it off).
* **Deterministic.** Fixed row chunks and fixed-order reductions: the same inputs give a bitwise
  identical loss.
* **Few fixed costs.** At small batches the op's time is mostly per-call overhead, about 35 ATen
  calls of 1.5 to 7 us each. No ATen call on the forward's path gets a Python number (each would
  be wrapped in a new 0-dim tensor, about 2.5 us): constants are cached 0-dim tensors
  (:func:`_constants`), with the same bits.

Each likelihood's math sits in one small function (``_bernoulli_logits``, ``_bernoulli_probs``,
``_gaussian``, ``_continuous_bernoulli``) that returns a chunk's per-row NLL and writes its
gradients, with an out-of-place twin of its derivatives for the recompute path. The op returns
four tensors ``(loss, reconstruction, kl, kl_eff)`` (see :func:`elbo`), or the loss alone where
the caller asks for nothing else (``elbo_loss`` without components: one output tensor, and
autograd's bookkeeping for one), whose backward forms every gradient from the one precomputed
per-element derivative and the grad_output of each term. A reduced float32 loss without free
bits and without d x runs its whole forward as three compiled calls (:func:`_cpu_loops.elbo`).
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor

from . import _backend, _cpu_loops, _memory


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _target(x: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """x as ``dtype`` (uint8 read as x/255); no copy when it already is ``dtype``."""
    if x.dtype == torch.uint8:
        return torch.div(x, 255.0, out=out) if out is not None else x.to(dtype).div_(255.0)
    return x.to(dtype)


# Rows are processed in chunks of about this many elements per torch thread: the temporaries stay
# in cache, are allocated once per call, and the gradient is written while the chunk's inputs are
# still cached; each of the ~20 ops per chunk is split over the threads, so a chunk grows with
# them (2 cores of an AMD EPYC, B = 4096: 1 thread 25 ms at 2^17 vs 33 at 2^16; 2 threads 16 ms
# at 2 x 2^17 vs 23 at 2^16). The Gaussian's few passes are cheap, so its chunks are 4x larger,
# fewer per call (B = 4096, alternating in one process: 6.2 -> 5.0 ms with 1 thread, 4.9 -> 3.8 ms
# with 2; B = 65536: 243 -> 230 and 147 -> 137 ms); 2^18 for the Bernoulli was within the noise.
# Re-checked with the Gaussian's two passes (88a4ba1), new / old per-block median: 2x chunks took
# 1.11 / 1.10 the time at B = 4096 (1 / 2 threads), 8x were within the noise (1.00 / 0.97).
_CHUNK_ELEMENTS = 1 << 17
_CHUNK_SCALE = {"gaussian": 4}


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), 8))


def _chunk_rows(width: int, likelihood: str | None = None) -> int:
    """Rows per chunk for rows of ``width`` elements (of ``likelihood``, whose chunks may be larger)."""
    elements = _CHUNK_ELEMENTS * _CHUNK_SCALE.get(likelihood, 1)
    return max(1, elements * _threads() // max(width, 1))


def _row_chunks(batch: int, width: int, likelihood: str | None = None):
    """Row slices covering [0, batch), or ``[None]`` (all rows at once) for a small batch or when
    traced by torch.compile, which fuses the passes anyway."""
    if torch.compiler.is_compiling():
        return [None]
    step = _chunk_rows(width, likelihood)
    if batch <= step:
        return [None]
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def _take(t: Tensor, rows) -> Tensor:
    return t if rows is None else t[rows]


_PROD_COLUMNS = 1000  # a product of up to 1000 values in [1, 2] stays below float64's 2**1024


def _sum_log(u: Tensor) -> Tensor:
    """Per-row ``sum(log(u))`` for u in [1, 2], as the log of a float64 product of at most 1000
    columns: one cheap product pass instead of a log per element, with an error of about 1e-13
    relative (float64 rounding) instead of float32's."""
    D = u.shape[1]
    out = None
    for j in range(0, D, _PROD_COLUMNS):
        part = u if D <= _PROD_COLUMNS else u[:, j: j + _PROD_COLUMNS]
        logp = torch.prod(part, 1, dtype=torch.float64).log_()
        out = logp if out is None else out.add_(logp)
    return out


def _cut(ws, rows: int) -> list[Tensor]:
    """The scratch tensors cut to a chunk of ``rows`` rows (no slicing for a whole one)."""
    return ws if ws[0].shape[0] == rows else [w[:rows] for w in ws]


# ---- likelihoods -------------------------------------------------------------------------------
#
# Each likelihood has one fast function for the forward, which returns a [r, D] chunk's per-row
# NLL (float64) and writes its gradients (d/ds, d/dt, d/dsigma, times ``scale``) into the buffers it
# is given, reusing the scratch tensors ``ws``; and one out-of-place, differentiable function of the
# same derivatives for the recompute path (a second backward of the graph, create_graph=True,
# torch.compile tracing). Arguments: ``s`` decoder outputs and ``t`` targets (compute dtype),
# ``sig`` the Gaussian's per-element sigma chunk or None, and the floats ``inv_sigma``/``log_norm``
# used when it is None (see kernels/likelihoods.py for the math, the same functions). ``ws`` is
# _IN_LOOP where the caller has checked that the fused loop takes the whole batch (see _forward):
# the fast function runs the loop without checking again (about 5 us a check at small batches).

_IN_LOOP = object()

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)

# continuous Bernoulli: log C(s) = log(s / tanh(s/2)) and d log C / ds = 1/s - 1/sinh(s) (odd).
# Near s = 0 (lam = 1/2) log C -> log 2 and the derivative is a difference of two poles: below
# |s| = 0.75 both come from their Taylor series in z = s^2 (the kernel's coefficients, y = s/2
# turned into z; their truncation at |s| = 0.75 is 2.6e-10 absolute in log C, 3.6e-10 of it, and
# 4.9e-9 absolute in its derivative, 4.2e-8 of it: tests/test_fallback.py measures both in
# float64). From 0.75 up, the closed forms, with
# a = |s| >= 0.75 and e = e^-a <= 0.47 (so 1 - e has no cancellation: plain exp, no expm1):
#     log C - log 2 = log(a (1 + e) / (2 (1 - e))),   tanh(a/2) = (1 - e) / (1 + e)
#     d log C / ds  = 1/a - 4 e / (2 (1 - e) (1 + e)),  1/sinh(a) = 2 e / (1 - e^2)
# (fp32: about 2e-7 absolute at 0.75, where 1/a and 1/sinh(a) are 1.33 and 1.22). The closed forms
# are evaluated at max(a, 0.75) and the series at min(a, 0.75), so both are finite everywhere and
# each element takes exactly one of them (small * [a < 0.75] + big * [a >= 0.75]). log C - log 2
# is what is formed per element (the log 2 is added to the float64 row sums), so a row near
# lam = 1/2 keeps its digits. The fused loop (fastvae/_cpu_loops.py) computes the same, with these
# coefficients, which live there.
_CB_LOG_C, _CB_DLOG_C = _cpu_loops.CB_LOG_C, _cpu_loops.CB_DLOG_C
_CB_SERIES_BELOW = _cpu_loops.CB_SERIES_BELOW


_CONSTANTS: dict = {}
_MAX_CONSTANTS = 64  # values that depend on the call (sigma, 1/B) are cached too: bound the cache


def _constants(values, like: Tensor) -> list[Tensor]:
    """``values`` (a tuple of floats) as 0-dim tensors of like's dtype and device, made once per
    dtype and device. An ATen call given a Python number wraps it in a new 0-dim tensor each time
    (about 2.5 us per call on this project's 2-core EPYC, where a small op costs 1.5 to 4 us); a
    cached one is passed as it is, with the same result to the bit."""
    if torch.compiler.is_compiling():
        # traced, the numbers become constants of the graph; a cached tensor made inside a
        # compiled region would be one of its outputs, which a CUDA-graph replay overwrites
        return [torch.full((), v, dtype=like.dtype, device=like.device) for v in values]
    key = (values, like.dtype, like.device)
    c = _CONSTANTS.get(key)
    if c is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        c = _CONSTANTS[key] = [torch.tensor(v, dtype=like.dtype, device=like.device) for v in values]
    return c


def _scalars(values, like: Tensor, cached: bool) -> list[Tensor]:
    """``values`` as 0-dim tensors like ``like``: cached (the forward's single pass) or new ones
    (the recompute path, which torch.compile traces as the autograd.Function's backward, where
    filling the module's cache is an unsafe side effect that dynamo refuses: "HOP: Unsafe side
    effect", fullgraph)."""
    if cached:
        return _constants(values, like)
    return [torch.full((), v, dtype=like.dtype, device=like.device) for v in values]


def _horner(z: Tensor, coefficients, out: Tensor | None) -> Tensor:
    """sum_k c_k z^(K-k) (coefficients highest first), written into ``out`` (None: a new tensor).

    Each Horner step ``c + p z`` is one ``addcmul`` with c a 0-dim tensor (6 passes for 6
    coefficients, where ``(p + c) z`` with Python floats took 10), the first one an ``add`` with
    alpha. The recompute path (``out`` None) makes the same calls, so both paths give the same
    bits, with constants of its own (see :func:`_scalars`)."""
    cs = _scalars(coefficients[1:], z, cached=out is not None)
    p = torch.add(cs[0], z, alpha=coefficients[0], out=out)      # c1 + c0 z
    for c in cs[1:]:
        p = torch.addcmul(c, p, z, out=out)                      # c + p z
    return p


def _cb_log_norm(s: Tensor, value: bool, grad: bool, ws=None) -> tuple[Tensor | None, Tensor | None]:
    """(log C(s) - log 2 if ``value``, d log C / ds if ``grad``) of the continuous Bernoulli on
    logits s.

    ``ws``: nine scratch tensors of s's shape for the forward's single pass, or None: out of place
    and differentiable (the recompute path). The same ops either way, so both paths give the same
    bits. One exp serves both closed forms.
    """
    o = (lambda i: None) if ws is None else (lambda i: ws[i])
    T = _CB_SERIES_BELOW
    one, two, t_below = _scalars((1.0, 2.0, T), s, cached=ws is not None)
    a = torch.abs(s, out=o(0))
    if ws is not None:
        below, above = torch.lt(a, t_below, out=o(1)), torch.ge(a, t_below, out=o(2))
    else:
        below, above = (a < T).to(s.dtype), (a >= T).to(s.dtype)
    a_small = torch.clamp(a, max=T, out=o(3))                       # the series' argument
    z = torch.mul(a_small, a_small, out=o(4))
    a_big = torch.clamp(a, min=T, out=o(0))                         # the closed forms' argument
    e = torch.exp(torch.neg(a_big, out=o(5)), out=o(5))            # e^-a in (0, 0.47]
    w = torch.add(e, one, out=o(6))                                 # 1 + e
    m2 = torch.add(two, e, alpha=-2.0, out=o(7))                    # 2 (1 - e): -2 e exact, one rounding
    log_c = d_log_c = None
    if value:
        big = torch.log(torch.div(torch.mul(a_big, w, out=o(8)), m2, out=o(8)), out=o(8))
    if grad:
        q = torch.div(e, torch.mul(m2, w, out=o(6)), out=o(6))     # e / (2 (1 - e^2))
        big_d = torch.sub(torch.reciprocal(a_big, out=o(0)), q, alpha=4.0, out=o(0))
    if value:
        small = torch.mul(torch.mul(_horner(z, _CB_LOG_C, o(5)), z, out=o(5)), below, out=o(5))
        log_c = torch.addcmul(small, big, above, out=o(5))         # exact: each element one branch
    if grad:
        small = torch.mul(torch.mul(_horner(z, _CB_DLOG_C, o(6)), a_small, out=o(6)), below, out=o(6))
        d = torch.addcmul(small, big_d, above, out=o(6))
        d_log_c = torch.mul(d, torch.sign(s, out=o(7)), out=o(6))
    return log_c, d_log_c


def _loop_args(likelihood: str, inv_sigma: float, log_norm: float, D: int, scale: float):
    """(element, scale, row_mul, row_add) of ``likelihood``'s fused loop over rows of D elements
    (see _cpu_loops.run): the Gaussian's row sums of (s - t)^2 times k/2 plus D log_norm inside the
    loop (the same two float64 roundings as two ATen ops after it; -0.0 adds nothing), its gradient
    ks (s - t); the continuous Bernoulli's bce - (log C - log 2) minus D log 2 per row (x + (-c) is
    x - c to the bit)."""
    if likelihood == "gaussian":
        k = inv_sigma * inv_sigma
        return "gaussian", k * scale, 0.5 * k, D * log_norm if log_norm != 0.0 else -0.0
    if likelihood == "continuous_bernoulli":
        return "continuous_bernoulli", scale, 1.0, -(D * _LOG_2)
    return "bernoulli_logits", scale, 1.0, -0.0


def _bernoulli_logits(s, t, sig, inv_sigma, log_norm, ws, d_s, d_t, d_sig, scale, guard=None) -> Tensor:
    """BCE on logits, ``softplus(s) - s*t``, per row. Writes ``scale * (sigmoid(s) - t)`` into d_s
    (accurate relative to itself at confident logits) and ``-scale * s`` into d_t. ``guard``: take
    s (h - t) as 0 where h = t also at s = +-inf (see below); None: on CUDA and under tracers, and
    on CPU for the rows that need it."""
    if ws is _IN_LOOP or _cpu_loops.takes(s, t):  # the fused loop (same math, one pass)
        element, *loop = _loop_args("bernoulli", inv_sigma, log_norm, s.shape[1], scale)
        rows = _cpu_loops.run(element, s, t, d_s, *loop)
        if d_t is not None:
            torch.mul(s, _constants((-scale,), s)[0], out=d_t)
        return rows
    a, b = _cut(ws, s.shape[0])[:2]
    zero, one = _constants((0.0, 1.0), s)
    e = torch.abs(s, out=a).neg_().exp_()          # e = exp(-|s|) in (0, 1]
    u = torch.add(e, one, out=b)                   # u = fl(1 + e) in [1, 2]
    if d_s is not None:
        torch.div(e, u, out=d_s)                   # q = sigmoid(-|s|), accurate also when tiny
    rows = _sum_log(u)                             # sum log(u), float64
    c = torch.sub(e, u.sub_(one), out=b)           # e - (u - 1): log1p(e) = log(u) + c to 1e-7
    h = torch.gt(s, zero, out=a)                   # h = [s > 0]
    if d_s is not None:
        d_s.addcmul_(d_s, h, value=-2.0)           # q (1 - 2h)
    ht = h.sub_(t)                                 # h - t: exact at t = 0 or 1
    # relu(s) - s*t = s (h - t) >= 0, exact at t = 0/1, plus c (the few elements where s (h - t)
    # is 0, the confident and right ones, keep all of c): one row sum for both.
    # s (h - t) is 0 where h = t, also at s = +-inf (its limit), where the product is inf * 0 = NaN:
    # guarded, those products are taken as 0 (a NaN in s stays NaN through c)
    if guard is None:  # reading the rows' sums back would sync a GPU, or break a tracer's graph
        guard = s.is_cuda or torch.compiler.is_compiling() or type(s) is not torch.Tensor
    rows += c.addcmul_(s.masked_fill(ht == 0, 0.0) if guard else s, ht).sum(1)
    if d_s is not None:
        # sigmoid(s) - t = (h - t) + q (1 - 2h): -sigmoid(-s) + (1 - t) for s > 0, so no
        # cancellation where the model is confident and right (sigmoid(s) would round to 1)
        d_s.add_(ht)
        if scale != 1.0:
            d_s.mul_(_constants((scale,), s)[0])
    if d_t is not None:
        torch.mul(s, _constants((-scale,), s)[0], out=d_t)
    if not guard:  # on CPU: the rows that came out NaN (an infinite or NaN logit) again, guarded
        bad = torch.isnan(rows)
        if bad.any():
            rows[bad] = _bernoulli_logits(s[bad], t[bad], sig, inv_sigma, log_norm, ws, None, None, None,
                                          scale, guard=True)
    return rows


def _loop_grad(element: str, s: Tensor, t: Tensor, want, scale: float) -> Tensor | None:
    """d/ds (times scale) from ``element``'s fused loop, as the forward wrote it, for the recompute
    path outside autograd and tracing; None where it is not wanted or the loop does not serve."""
    if not (want[0] and not torch.is_grad_enabled() and _cpu_loops.takes(s, t)):
        return None
    ds = torch.empty_like(s, memory_format=torch.contiguous_format)
    _cpu_loops.run(element, s, t, ds, scale)
    return ds


def _bernoulli_logits_grads(s, t, sig, inv_sigma, log_norm, want, scale):
    ds = _loop_grad("bernoulli_logits", s, t, want, scale)  # as the forward
    if ds is None and want[0]:
        # the arithmetic of _bernoulli_logits: sigmoid(s) - t = (h - t) + q (1 - 2h)
        e = torch.exp(-torch.abs(s))
        q = e / (1.0 + e)
        h = (s > 0).to(s.dtype)
        ds = (torch.addcmul(q, q, h, value=-2.0) + (h - t)) * scale
    return ds, (s * -scale if want[1] else None), None


def _bernoulli_probs(p, t, sig, inv_sigma, log_norm, ws, d_s, d_t, d_sig, scale) -> Tensor:
    """``F.binary_cross_entropy(p, t)`` per row (logs clamped at -100), except that a probability
    outside [0, 1] or NaN gives NaN (a log of a negative number) instead of an error, as on the
    Triton path. d_s with PyTorch's guard: ``(p - t) / max(p (1 - p), 1e-12)``; d_t the difference
    of the clamped logs."""
    a, b = _cut(ws, p.shape[0])[:2]
    one, c = _constants((1.0, scale), p)
    logp = torch.log(p, out=a).clamp_(min=-100.0)
    log1mp = torch.neg(p, out=b).log1p_().clamp_(min=-100.0)
    if d_t is not None:
        torch.sub(log1mp, logp, out=d_t)
        if scale != 1.0:
            d_t.mul_(c)
    # -(t log p + (1 - t) log(1 - p)), with (1 - t) log(1 - p) as log(1 - p) - t log(1 - p): exact
    # at t = 0 and t = 1, as F.binary_cross_entropy's form
    nll = log1mp.addcmul_(t, log1mp, value=-1.0).addcmul_(t, logp)
    rows = nll.sum(1, dtype=torch.float64).neg_()
    if d_s is not None:
        den = torch.neg(p, out=d_s).add_(one).mul_(p).clamp_(min=1e-12)  # (1 - p) p
        torch.sub(p, t, out=a).div_(den)
        torch.mul(a, c, out=d_s)
    return rows


def _bernoulli_probs_grads(p, t, sig, inv_sigma, log_norm, want, scale):
    ds = (p - t) / ((1.0 - p) * p).clamp(min=1e-12) * scale if want[0] else None
    dt = (torch.log1p(-p).clamp(min=-100.0) - torch.log(p).clamp(min=-100.0)) * scale if want[1] else None
    return ds, dt, None


def _sum_squares(r: Tensor) -> Tensor:
    """Per-row sum of squares, float64: ``vector_norm(r, dim=1)**2``, one pass over r where a
    product and a sum take two. Its fp32 accumulation is a plain vectorised sum plus a sqrt and a
    square (measured: 3.0e-7 relative at most on 668 random rows of 784, against 1.4e-7 for
    ``(r * r).sum(1)``; the loss's tests ask 1e-5)."""
    return torch.linalg.vector_norm(r, dim=1).double().square_()


# the gradient's factors ks = scale / sigma^2 for which the Gaussian's squares are summed from the
# gradient ks (s - t): within 2**+-32 its fp32 squares overflow only where |s - t| > 4e9 and turn
# subnormal only where |s - t| < 5e-10 (negligible terms); further from 1 the squares are summed
# from s - t, with a pass more
_KS_FROM_GRAD = (2.0 ** -32, 2.0 ** 32)
# aten::mse_loss_backward.grad_input, called through its C++ handle: 6 us a call on this project's
# 2-core EPYC, where ``torch.ops.aten.mse_loss_backward(...)`` takes 15 us (``torch.sub`` 2-3 us);
# torch.compile traces the overload itself
_MSE_OVERLOAD = torch.ops.aten.mse_loss_backward.grad_input
_MSE_LOSS_BACKWARD = _MSE_OVERLOAD._op


def _gaussian(s, t, sig, inv_sigma, log_norm, ws, d_s, d_t, d_sig, scale) -> Tensor:
    """``0.5 z^2 + log_norm`` with ``z = (s - t) / sigma`` per row: sigma the floats (inv_sigma,
    log_norm), or the per-element ``sig`` (log_norm = log sig + log(2 pi)/2). Gradients
    ``d_s = z / sigma = -d_t``, ``d_sig = (1 - z^2) / sigma``, times scale."""
    D = s.shape[1]
    # the fused loop: sum (s - t)^2 and ks (s - t)
    if sig is None and (ws is _IN_LOOP or _cpu_loops.takes(s, t)):
        g = d_s if d_s is not None else d_t
        element, *loop = _loop_args("gaussian", inv_sigma, log_norm, D, scale)
        rows = _cpu_loops.run(element, s, t, g, *loop)
        if d_t is not None:
            torch.neg(g, out=d_t)
        return rows
    a, b = _cut(ws, s.shape[0])[:2]
    if sig is None:  # the gradient ks (s - t) and the row sums of squares: two passes
        k = inv_sigma * inv_sigma
        ks = k * scale
        if _KS_FROM_GRAD[0] <= ks <= _KS_FROM_GRAD[1]:
            # g = ks (s - t) (d recon, or scratch under no_grad) in one pass, as
            # mse_loss_backward's 2 (s - t) h with h = ks / 2 (the same bits as (s - t) * ks:
            # halving and doubling are exact), and the squares' row sums taken from it,
            # 0.5 k |s - t|^2 = |g|^2 * 0.5 k / ks^2, with or without gradients the same bits;
            # forming s - t first took a third pass when ks != 1
            g = a if d_s is None else d_s
            if ks == 1.0:
                torch.sub(s, t, out=g)
            else:
                op = _MSE_LOSS_BACKWARD if not torch.compiler.is_compiling() else _MSE_OVERLOAD
                op(_constants((0.5 * ks,), s)[0], s, t, 0, grad_input=g)
            if d_t is not None:
                torch.neg(g, out=d_t)
            r, factor = g, 0.5 * k / (ks * ks)
        else:
            c, neg_c = _constants((ks, -ks), s)
            r = torch.sub(s, t, out=a)
            if d_s is not None:
                torch.mul(r, c, out=d_s)
            if d_t is not None:
                torch.mul(r, neg_c, out=d_t)
            factor = 0.5 * k
        rows = _sum_squares(r)
        f, norm = _constants((factor, D * log_norm), rows)
        rows.mul_(f)
        return rows.add_(norm) if log_norm != 0.0 else rows
    one, c, neg_c = _constants((1.0, scale, -scale), s)
    inv = torch.reciprocal(sig, out=b)
    z = torch.sub(s, t, out=a).mul_(inv)
    if d_sig is not None:
        torch.mul(z, z, out=d_sig).sub_(one).mul_(inv).mul_(neg_c)
    if d_s is not None:
        torch.mul(z, inv, out=d_s)
        if scale != 1.0:
            d_s.mul_(c)
    if d_t is not None:
        torch.mul(z, inv, out=d_t).mul_(neg_c)
    rows = _sum_squares(z)
    half, norm = _constants((0.5, D * _LOG_SQRT_2PI), rows)
    rows.mul_(half)
    rows += torch.log(sig, out=a).sum(1, dtype=torch.float64)
    return rows.add_(norm)


def _gaussian_grads(s, t, sig, inv_sigma, log_norm, want, scale):
    # the arithmetic of _gaussian, out of place
    if sig is None:
        r = s - t
        k = inv_sigma * inv_sigma
        return (r * (k * scale) if want[0] else None), (r * (-k * scale) if want[1] else None), None
    inv = torch.reciprocal(sig)
    z = (s - t) * inv
    return ((z * inv * scale if want[0] else None), (z * inv * -scale if want[1] else None),
            ((z * z - 1.0) * inv * -scale if want[2] else None))


def _continuous_bernoulli(s, t, sig, inv_sigma, log_norm, ws, d_s, d_t, d_sig, scale) -> Tensor:
    """The continuous Bernoulli on logits: ``bce(s, t) - log C(s)`` per row (see _cb_log_norm)."""
    D = s.shape[1]
    if ws is _IN_LOOP or _cpu_loops.takes(s, t):  # the fused loop: bce - (log C - log 2) per element
        element, *loop = _loop_args("continuous_bernoulli", inv_sigma, log_norm, D, scale)
        rows = _cpu_loops.run(element, s, t, d_s, *loop)
        if d_t is not None:
            torch.mul(s, _constants((-scale,), s)[0], out=d_t)
        return rows
    rows = _bernoulli_logits(s, t, None, 1.0, 0.0, ws, d_s, d_t, None, scale)
    log_c, d_log_c = _cb_log_norm(s, True, d_s is not None, _cut(ws, s.shape[0]))
    if d_s is not None:
        d_s.sub_(d_log_c.mul_(scale) if scale != 1.0 else d_log_c)
    # near s = 0 the bce and log C rows are both about D log 2 and cancel: the row sums of
    # log C - log 2 (small, one sign: summed in fp32, accurate relative to themselves) and the
    # D log 2 are taken out of the bce's float64 rows
    return rows.sub_(log_c.sum(1)).sub_(D * _LOG_2)


def _continuous_bernoulli_grads(s, t, sig, inv_sigma, log_norm, want, scale):
    ds = _loop_grad("continuous_bernoulli", s, t, want, scale)  # as the forward
    if ds is not None:
        return ds, (s * -scale if want[1] else None), None
    ds, dt, _ = _bernoulli_logits_grads(s, t, None, 1.0, 0.0, want, scale)
    if ds is not None:
        d_log_c = _cb_log_norm(s, False, True)[1]
        ds = ds - (d_log_c * scale if scale != 1.0 else d_log_c)
    return ds, dt, None


# scratch tensors per chunk that each likelihood's fast function uses
_WORKSPACES = {"continuous_bernoulli": 9}


def _likelihood(likelihood: str, from_logits: bool):
    """(fast function, recompute function) of a likelihood."""
    if likelihood == "bernoulli":
        if from_logits:
            return _bernoulli_logits, _bernoulli_logits_grads
        return _bernoulli_probs, _bernoulli_probs_grads
    if likelihood == "gaussian":
        return _gaussian, _gaussian_grads
    if likelihood == "continuous_bernoulli":
        return _continuous_bernoulli, _continuous_bernoulli_grads
    raise ValueError(f"unknown likelihood {likelihood!r}")


# ---- KL, free bits, reductions -----------------------------------------------------------------

def _kl_loop(mu: Tensor, logvar: Tensor, free_bits: float) -> bool:
    """Whether the KL runs as a fused loop (no free bits, float32 CPU tensors; see _kl_terms)."""
    return free_bits <= 0.0 and _cpu_loops.takes(logvar, mu)


def _kl_h(mu: Tensor, logvar: Tensor, free_bits: float) -> Tensor:
    """h = exp(logvar) - 1 as the forward made it (the recompute path's: the same bits outside
    autograd and tracing, else torch.expm1, differentiable)."""
    if not torch.is_grad_enabled() and _kl_loop(mu, logvar, free_bits):
        return _kl_terms(mu, logvar, free_bits)[3]
    return torch.expm1(logvar)


def _kl_terms(mu: Tensor, logvar: Tensor, free_bits: float):
    """(kl rows, kl_eff rows (float64 from the fused loop, else in logvar's dtype), the [L] float
    mask of the dims above the free-bits floor or None,
    h = exp(logvar) - 1 (expm1), a buffer of the op's own); kl_eff_i = sum_k (KL_ik if active_k else
    free_bits). The KL is ``0.5 (h - logvar + mu^2)`` per element; ``h`` is d KL / d logvar
    times 2, kept for the backward. Without free bits, in float32 on CPU, one fused loop makes h
    and the float64 rows (fastvae/_cpu_loops.py)."""
    if _kl_loop(mu, logvar, free_bits):
        rows, h = _cpu_loops.kl(logvar, mu)
        return rows, rows, None, h
    h = torch.expm1(logvar)
    kl2 = torch.sub(h, logvar).addcmul_(mu, mu)              # 2 KL_ik
    if free_bits <= 0.0:
        kl = kl2.sum(1).mul_(_constants((0.5,), logvar)[0])
        return kl, kl, None, h
    kl_el = kl2.mul_(0.5)
    with torch.no_grad():
        active = kl_el.mean(0) > free_bits
    kl_eff = torch.where(active, kl_el, free_bits).sum(1)
    return kl_el.sum(1), kl_eff, active.to(kl_el.dtype), h


def _kl_grads(mu: Tensor, h: Tensor, weight) -> tuple[Tensor, Tensor]:
    """(d / d mu, d / d logvar) of ``weight * KL``: ``weight * mu`` and ``weight * h / 2``, with
    ``h = exp(logvar) - 1``; ``weight`` a float or a tensor broadcasting against mu."""
    return mu * weight, h * (0.5 * weight)


def _kl_weight(g, beta: float, active: Tensor | None, scale: float, per_row: bool):
    """d out . g / d KL_ik: ``((g0 beta + g3) a_k + g2) * scale``, [B, L] / [L] / a scalar; ``g``
    the grad_outputs of (loss, reconstruction, kl, kl_eff): tensors, or floats (then so is the
    weight, unless there is a free-bits mask)."""
    gk, g2 = g[0] * beta + g[3], g[2]
    if per_row:
        gk, g2 = gk[:, None], g2[:, None]
    w = gk + g2 if active is None else gk * active + g2
    return w * scale if scale != 1.0 else w


# ---- the op ------------------------------------------------------------------------------------

def _loop_takes_all(likelihood: str, from_logits: bool, sigma: Tensor | None) -> bool:
    """Whether a fused loop (fastvae/_cpu_loops.py) computes the whole likelihood, so that the
    forward runs it once over the batch: the Bernoulli on logits, the continuous Bernoulli and the
    Gaussian with a number sigma (a per-element sigma takes the ATen formulation)."""
    return ((likelihood == "bernoulli" and from_logits) or likelihood == "continuous_bernoulli"
            or (likelihood == "gaussian" and sigma is None))


def _as(t: Tensor, dt: torch.dtype) -> Tensor:
    return t if t.dtype == dt else t.to(dt)


def _grad_buffer(t: Tensor, dt: torch.dtype) -> Tensor:
    """A contiguous buffer for t's gradient, in the compute dtype (cast when handed over); a large
    one on CPU is advised for huge pages (fastvae/_memory.py: each fresh 4 KB page is a fault)."""
    return _memory.empty(t.shape, dt, t.device)


def _forward(recon, x, mu, logvar, sigma, args, want, terms=True):
    """((loss, reconstruction, kl, kl_eff), (d recon, d x, d sigma), active, h): the four terms
    reduced like the op's output (four distinct tensors; where ``terms`` is False the loss comes
    first and the fused path makes it alone, ``(loss,)``) and, where ``want`` (for recon, x,
    sigma), the likelihood's gradients for ``(g0 + g1) = 1`` (scale of the reduction included), in
    the compute dtype; ``h = exp(logvar) - 1`` (see _kl_terms)."""
    inv_sigma, log_norm, beta, free_bits, likelihood, from_logits, reduction = args
    dt = _compute_dtype(recon)
    B, D = recon.shape
    div = float(B) if reduction == "batchmean" else 1.0  # the totals' divisor; scale its inverse
    scale = 1.0 / B if reduction == "batchmean" else 1.0
    bufs = [_grad_buffer(t, dt) if w else None for t, w in zip((recon, x, sigma), want)]
    if (reduction != "none" and free_bits <= 0.0 and not want[1]
            and _loop_takes_all(likelihood, from_logits, sigma)
            and _cpu_loops.takes(logvar, mu) and _cpu_loops.takes(recon, x)):
        # the common case (a reduced loss, float32, no free bits, no d x): the likelihood's loop,
        # the KL's and the totals in three compiled calls, no ATen op between them (at B = 128
        # most of the op's time is such fixed costs)
        element, *loop = _loop_args(likelihood, inv_sigma, log_norm, D, scale)
        out, h = _cpu_loops.elbo(element, recon, x, bufs[0], *loop, logvar, mu, div, beta, terms)
        return out, bufs, None, h
    fast = _likelihood(likelihood, from_logits)[0]
    kl, kl_eff, active, h = _kl_terms(_as(mu, dt), _as(logvar, dt), free_bits)
    if _loop_takes_all(likelihood, from_logits, sigma) and _cpu_loops.takes(recon, x):
        # one fused loop over the whole batch (x as it is, uint8 too), no chunks, no scratch
        chunks, ws, t_ws, raw_x = [None], _IN_LOOP, None, True
    else:
        chunks = _row_chunks(B, D, likelihood)
        step = B if chunks[0] is None else chunks[0].stop
        ws = [torch.empty(step, D, dtype=dt, device=recon.device)
              for _ in range(_WORKSPACES.get(likelihood, 2))]
        t_ws = torch.empty(step, D, dtype=dt, device=recon.device) if x.dtype == torch.uint8 else None
        raw_x = False
    rec = None  # float64 rows
    for c in chunks:
        s = _as(_take(recon, c), dt)
        t = x if raw_x else _target(_take(x, c), dt, None if t_ws is None else t_ws[: s.shape[0]])
        sig = None if sigma is None else _as(_take(sigma, c), dt)
        part = fast(s, t, sig, inv_sigma, log_norm, ws,
                    *(None if b is None else _take(b, c) for b in bufs), scale)
        if c is None:
            rec = part
        else:
            if rec is None:
                rec = torch.empty(B, dtype=torch.float64, device=recon.device)
            rec[c] = part
    same = kl_eff is kl  # no free bits: one KL, returned as two distinct outputs
    if (same and reduction != "none" and dt == torch.float32 and rec.dtype == torch.float64
            and kl.dtype == torch.float64 and rec.is_contiguous() and kl.is_contiguous()):
        # the fused loops' float64 rows: the four totals in one call (_cpu_loops.totals)
        terms = _cpu_loops.totals(rec, kl, div, beta)
        if terms is not None:
            return terms, bufs, active, h
    kl = _as(kl, dt)
    kl_eff = kl if same else kl_eff
    if reduction != "none":  # the batch's sum (or mean) of the float64 rows, rounded once
        red = torch.sum if reduction == "sum" else torch.mean
        rec, kl, kl_eff = red(rec), red(kl), (None if same else red(kl_eff))
    rec = rec.to(dt)
    kl_eff = kl.clone() if same else kl_eff
    loss = torch.add(rec, kl_eff, alpha=beta) if beta != 0.0 else rec.clone()
    return (loss, rec, kl, kl_eff), bufs, active, h


def _recompute_grads(recon, x, mu, logvar, sigma, args, want, g, active):
    """The gradients from the saved inputs with out-of-place ops: for a second backward of the
    same graph, ``create_graph=True`` (differentiable) and torch.compile tracing. ``g``: the
    grad_outputs of the four terms stacked, [4] or [4, B]."""
    inv_sigma, log_norm, beta, free_bits, likelihood, from_logits, reduction = args
    dt = _compute_dtype(recon)
    per_row = reduction == "none"
    scale = 1.0 / recon.shape[0] if reduction == "batchmean" else 1.0
    grads = [None] * 5
    if want[0] or want[1] or want[4]:
        f = g[0] + g[1]
        f = f[:, None] if per_row else f
        sig = None if sigma is None else sigma.to(dt)
        # the fast path's arithmetic (scale inside, then times f): a second backward of the graph
        # gives the first one's gradients to the bit
        parts = _likelihood(likelihood, from_logits)[1](
            recon.to(dt), _target(x, dt), sig, inv_sigma, log_norm, (want[0], want[1], want[4]), scale)
        for i, d in zip((0, 1, 4), parts):
            if want[i] and d is not None:
                grads[i] = d * f
    if want[2] or want[3]:
        m, v = mu.to(dt), logvar.to(dt)
        if (not per_row and g.device.type == "cpu" and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            g = g.tolist()  # Python floats, as the single pass reads them: the same KL weight
        d_mu, d_logvar = _kl_grads(m, _kl_h(m, v, free_bits), _kl_weight(g, beta, active, scale, per_row))
        grads[2] = d_mu if want[2] else None
        grads[3] = d_logvar if want[3] else None
    return grads


def _grad_stack(gs, dt: torch.dtype) -> Tensor:
    """The four terms' grad_outputs as one [4] or [4, B] tensor in ``dt``; None (an output the
    backward did not reach) as zeros."""
    ref = next(t for t in gs if t is not None)
    return _as(torch.stack([torch.zeros_like(ref) if t is None else t for t in gs]), dt)


def _is_one(grad: Tensor) -> bool:
    """grad == 1 everywhere, checked on the host: only for CPU tensors, where it is free."""
    if grad.device.type != "cpu":
        return False
    return grad.item() == 1.0 if grad.numel() == 1 else bool((grad == 1).all())


class ELBOFunction(torch.autograd.Function):
    """(loss, reconstruction, kl, kl_eff), each reduced over the batch (0-dim) or per row ([B]),
    or the loss alone where ``terms`` is False (one output: the others cost a tensor each and
    autograd's bookkeeping for them); 2-D inputs (recon, x [B, N]; mu, logvar [B, L]; sigma None
    or [B, N])."""

    @staticmethod
    def forward(ctx, recon, x, mu, logvar, sigma, args, grad_enabled: bool, terms: bool = True):
        # the likelihood's gradients are precomputed only when a backward will come (grad mode was
        # on outside the Function and an input requires grad), and never under tracing
        need = ctx.needs_input_grad
        want = (need[0], need[1], sigma is not None and need[4])
        compiling = torch.compiler.is_compiling()
        single_pass = grad_enabled and any(need[:5]) and not compiling
        if not compiling:  # the unused outputs' grad_outputs come as None, not as zeros
            ctx.set_materialize_grads(False)
        # autocast-safe: the loss is always computed in fp32 (or fp64), whatever autocast is on
        dev = recon.device.type
        with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else nullcontext():
            out, bufs, active, h = _forward(recon, x, mu, logvar, sigma, args,
                                            want if single_pass else (False,) * 3, terms)
        ctx.save_for_backward(recon, x, mu, logvar, sigma)
        ctx.args = args
        ctx.active = active
        ctx.single = (bufs, h) if single_pass else None
        ctx.terms = terms
        return out if terms else out[0]

    @staticmethod
    def backward(ctx, *gs):
        if not ctx.terms:  # the loss alone: the other terms' grad_outputs are None
            gs = (gs[0], None, None, None)
        if gs[0] is None and all(t is None for t in gs):  # no output reached (gradcheck tries it)
            return (None,) * 8
        args = ctx.args
        beta, reduction = args[2], args[-1]
        want = ctx.needs_input_grad[:5]
        single, ctx.single = ctx.single, None  # handed over once: a later backward recomputes
        saved = ctx.saved_tensors
        dt = _compute_dtype(saved[0])
        per_row = reduction == "none"
        if single is None or torch.is_grad_enabled():
            grads = _recompute_grads(*saved, args, want, _grad_stack(gs, dt), ctx.active)
        else:
            bufs, h = single
            if not per_row and saved[0].device.type == "cpu":
                g = [0.0 if t is None else t.item() for t in gs]  # free on CPU: Python floats
                f = g[0] + g[1]
                scale_bufs = f != 1.0
            else:
                g = _grad_stack(gs, dt)
                f = g[0] + g[1]
                scale_bufs = not _is_one(f)
                f = f[:, None] if per_row else f
            if scale_bufs:  # scale the op's own buffers in place
                for t in bufs:
                    if t is not None:
                        t.mul_(f)
            grads = [bufs[0], bufs[1], None, None, bufs[2]]
            if want[2] or want[3]:
                scale = 1.0 / h.shape[0] if reduction == "batchmean" else 1.0
                w = _kl_weight(g, beta, ctx.active, scale, per_row)
                if isinstance(w, float):  # no Python number to wrap: cached constants
                    w, half = _constants((w, 0.5 * w), h)
                else:
                    half = 0.5 * w
                grads[2] = torch.mul(_as(saved[2], dt), w) if want[2] else None
                grads[3] = h.mul_(half) if want[3] else None  # h is the op's own
        # in the compute dtype, each None where its input wants none: autograd casts each one to
        # its input's dtype (and passes it as it is where it already is)
        return (*grads, None, None, None)


class ELBOFunctionJvp(ELBOFunction):
    """ELBOFunction with a forward derivative, for forward-mode AD (``torch.autograd.forward_ad``,
    gradcheck's ``check_forward_ad``). Taken only inside a dual level: dynamo cannot trace a
    Function that defines ``jvp``, so torch.compile keeps ELBOFunction."""

    @staticmethod
    def forward(ctx, recon, x, mu, logvar, sigma, args, grad_enabled: bool, terms: bool = True):
        out = ELBOFunction.forward(ctx, recon, x, mu, logvar, sigma, args, grad_enabled, terms)
        ctx.save_for_forward(recon, x, mu, logvar, sigma)
        return out

    @staticmethod
    def jvp(ctx, *tangents):
        """Each term's derivative along the inputs' tangents: its gradients (the recompute path's,
        one term at a time) dotted with them, per row for reduction="none"."""
        saved = ctx.saved_tensors
        reduction = ctx.args[-1]
        dt = _compute_dtype(saved[0])
        B = saved[0].shape[0]
        tan = tangents[:5]
        want = tuple(t is not None for t in tan)
        out = []
        for k in range(4):
            g = torch.zeros((4, B) if reduction == "none" else (4,), dtype=dt, device=saved[0].device)
            g[k] = 1.0
            total = torch.zeros(g.shape[1:], dtype=dt, device=g.device)
            for d, t in zip(_recompute_grads(*saved, ctx.args, want, g, ctx.active), tan):
                if d is not None and t is not None:
                    prod = (d * _as(t, dt)).reshape(B, -1)
                    total = total + (prod.sum(1) if reduction == "none" else prod.sum())
            out.append(total)
            if not ctx.terms:  # the loss alone
                return total
        return tuple(out)


def elbo(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, sigma: Tensor | None, inv_sigma: float,
         log_norm: float, beta: float, free_bits: float, likelihood: str, from_logits: bool,
         reduction: str, terms: bool = True) -> tuple[Tensor, ...]:
    """The backend contract (README, kernels/likelihoods.py): ``(loss, reconstruction, kl,
    kl_eff)``, each reduced over the batch (0-dim) or per row ([B], reduction="none"), float32
    (float64 for float64 recon); differentiable w.r.t. recon, x, mu, logvar and sigma. ``(loss,)``
    alone where ``terms`` is False (the same loss, to the bit)."""
    args = (float(inv_sigma), float(log_norm), float(beta), float(free_bits), likelihood,
            bool(from_logits), reduction)
    fn = ELBOFunctionJvp if _backend.forward_ad_on() else ELBOFunction
    out = fn.apply(recon, x, mu, logvar, sigma, args, torch.is_grad_enabled(), terms)
    return out if terms else (out,)


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """z = mu + exp(logvar / 2) * eps, differentiated by autograd; computed in fp32 (fp64 for
    fp64) and rounded once to the output dtype, like the Triton kernel. ``eps`` may carry leading
    sample dimensions ([K, *mu.shape]): mu and logvar broadcast, and autograd sums their gradients
    over the samples."""
    out = torch.promote_types(mu.dtype, logvar.dtype)
    dt = torch.float64 if out == torch.float64 else torch.float32
    if out == dt and eps.dtype == dt:
        return torch.addcmul(mu, torch.exp(0.5 * logvar), eps)
    return torch.addcmul(mu.to(dt), torch.exp(0.5 * logvar.to(dt)), eps.to(dt)).to(out)
