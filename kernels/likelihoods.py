"""The per-element math of fastvae's losses, once, as ``@triton.jit`` functions shared by every kernel
that needs it (the ELBO kernels, the fused decoder-output kernel of the IWAE evaluator).

Each decoder likelihood gives, for one pixel with decoder output ``s`` and target ``t``,
``(nll, d nll / d s, d nll / d t, d nll / d sigma)``; the Gaussian KL gives, for one latent,
``(kl, d kl / d mu, d kl / d logvar)``. Accumulation is fp32 everywhere.

Likelihood codes (``tl.constexpr``), chosen by the launchers from the Python-side names:

* ``BERNOULLI_LOGITS``: s are logits, ``nll = max(s, 0) - s t + log(1 + e^-|s|)`` (BCE with logits;
  at s = +-inf its limit s (h - t), h = [s > 0], 0 where h = t);
* ``BERNOULLI_PROBS``: s are probabilities, ``F.binary_cross_entropy`` (logs clamped at -100);
  probabilities outside [0, 1] or NaN give NaN (never a finite loss, and no host sync);
* ``GAUSSIAN``: N(t; s, sigma^2), ``nll = (s - t)^2 / (2 sigma^2) + log sigma + log(2 pi) / 2``;
  the kernel is given ``inv_sigma = 1 / sigma`` and ``log_norm = log sigma + log(2 pi) / 2``
  (``"mse"`` is this with inv_sigma = sqrt(2), log_norm = 0: nll = (s - t)^2);
* ``CONT_BERNOULLI``: the continuous Bernoulli of Loaiza-Ganem & Cunningham (2019) on logits s,
  ``nll = bce(s, t) - log C(s)`` with ``C(s) = s / tanh(s / 2)`` (= 2 atanh(1 - 2 lam) / (1 - 2 lam)
  for lam = sigmoid(s)); near lam = 1/2 (|s| < 1) ``log C`` and its derivative come from series.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

BERNOULLI_LOGITS = 0
BERNOULLI_PROBS = 1
GAUSSIAN = 2
CONT_BERNOULLI = 3

LOG_SQRT_2PI = 0.9189385332046727  # log(2 pi) / 2
_LOG_SQRT_2PI = tl.constexpr(LOG_SQRT_2PI)  # the same, readable inside @triton.jit functions


def likelihood_code(likelihood: str, from_logits: bool) -> int:
    """The kernels' constexpr code of a likelihood name ("mse" is a Gaussian)."""
    if likelihood == "bernoulli":
        return BERNOULLI_LOGITS if from_logits else BERNOULLI_PROBS
    if likelihood in ("gaussian", "mse"):
        return GAUSSIAN
    if likelihood == "continuous_bernoulli":
        return CONT_BERNOULLI
    raise ValueError(f"unknown likelihood {likelihood!r}")


def likelihood_params(likelihood: str, sigma: float = 1.0) -> tuple[float, float]:
    """(inv_sigma, log_norm) of :func:`decoder_nll` for a number sigma: the Gaussian's
    ``1 / sigma`` and ``log sigma + log(2 pi) / 2``; "mse" is the Gaussian with sigma^2 = 1/2
    without its constant; the other likelihoods do not use them."""
    if likelihood == "mse":
        return 2.0 ** 0.5, 0.0
    if likelihood == "gaussian":
        return 1.0 / sigma, math.log(sigma) + LOG_SQRT_2PI
    return 1.0, 0.0


@triton.jit
def gaussian_sigma_params(sig):
    """(inv_sigma, log_norm) of :func:`decoder_nll` for a per-element sigma tensor."""
    return 1.0 / sig, tl.log(sig) + _LOG_SQRT_2PI


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
def _bce_logits(s, t):
    # BCE with logits and d/ds = sigmoid(s) - t, both from one e = exp(-|s|) in (0, 1] (no overflow)
    e = tl.exp(-tl.abs(s))
    # max(s, 0) - s t = s (h - t) with h = [s > 0], taken as 0 where h = t: at s = +-inf that is
    # the limit (inf - inf, or inf * 0, in the formula), as the CPU paths compute it
    ht = tl.where(s > 0.0, 1.0, 0.0) - t
    log1p_e = _log1p_small(e)
    nll = tl.where(ht == 0.0, log1p_e, s * ht + log1p_e)
    q = e / (1.0 + e)                            # sigmoid(-|s|)
    # sigmoid(s) - t as (1 - t) - q for s >= 0: no cancellation when t = 1 and s is confident
    ds = tl.where(s >= 0.0, (1.0 - t) - q, q - t)
    return nll, ds, e


@triton.jit
def _cb_log_norm(s, e):
    """(log C(s), d log C / d s) of the continuous Bernoulli, with e = exp(-|s|).

    log C = log(s / tanh(s/2)) = log|s| + log((1 + e) / (1 - e)),  d/ds = 1/s - 1/sinh(s).
    Both cancel near s = 0 (lam = 1/2); there, with y = s/2, the series
        log C = log 2 + y^2/3 - 7y^4/90 + 62y^6/2835 - 127y^8/18900 + 146y^10/66825 - ...
        d/ds  = s/6 - 7s^3/360 + 31s^5/15120 - 127s^7/604800 + 73s^9/3421440 - ... (to s^23)
    converge fast (ratio about (|s| / pi)^2 per term); they serve |s| < 1 (log C) and |s| < 1.5
    (d/ds, whose closed form still cancels ~3x there). In fp32 both stay within 2e-7 relative
    of float64 (the closed form of d/ds just above |s| = 1.5: up to 4e-7).
    """
    a = tl.abs(s)
    small = a < 1.0
    small_d = a < 1.5  # the closed form of d/ds cancels ~3x more near 1 than at 1.5
    y2 = 0.25 * s * s
    p = 11499383114.0 / 350813659321125.0
    p = p * y2 - 16931177.0 / 186080895000.0
    p = p * y2 + 32764.0 / 127702575.0
    p = p * y2 - 1414477.0 / 1915538625.0
    p = p * y2 + 146.0 / 66825.0
    p = p * y2 - 127.0 / 18900.0
    p = p * y2 + 62.0 / 2835.0
    p = p * y2 - 7.0 / 90.0
    p = p * y2 + 1.0 / 3.0
    log_c_small = 0.6931471805599453 + p * y2
    s2 = s * s
    g = -1982765468311237.0 / 846912068365871834726400000.0
    g = g * s2 + 3324754717.0 / 143888775912161280000.0
    g = g * s2 - 91546277357.0 / 401428831349145600000.0
    g = g * s2 + 5749691557.0 / 2554547108585472000.0
    g = g * s2 - 16931177.0 / 762187345920000.0
    g = g * s2 + 8191.0 / 37362124800.0
    g = g * s2 - 1414477.0 / 653837184000.0
    g = g * s2 + 73.0 / 3421440.0
    g = g * s2 - 127.0 / 604800.0
    g = g * s2 + 31.0 / 15120.0
    g = g * s2 - 7.0 / 360.0
    g = g * s2 + 1.0 / 6.0
    dlog_c_small = g * s
    a_big = tl.where(small, 1.0, a)              # keeps the unused branch finite
    e_big = tl.where(small, 0.5, e)
    log_c_big = tl.log(a_big * (1.0 + e_big) / (1.0 - e_big))
    dlog_c_big = 1.0 / a_big - 2.0 * e_big / (1.0 - e_big * e_big)
    dlog_c_big = tl.where(s < 0.0, -dlog_c_big, dlog_c_big)
    return tl.where(small, log_c_small, log_c_big), tl.where(small_d, dlog_c_small, dlog_c_big)


@triton.jit
def decoder_nll(s, t, inv_sigma, log_norm, LIKELIHOOD: tl.constexpr):
    """(nll, d/ds, d/dt, d/dsigma) of one pixel: decoder output s, target t (see the module doc).

    ``inv_sigma``/``log_norm`` are used by the Gaussian only (scalars or per-element tensors);
    d/dsigma is only meaningful for it. Every derivative is the exact derivative of the nll.
    """
    if LIKELIHOOD == 0:  # BERNOULLI_LOGITS
        nll, ds, e = _bce_logits(s, t)
        dt = -s
        dsig = ds
    elif LIKELIHOOD == 1:  # BERNOULLI_PROBS
        # the clamp keeps NaN: invalid probabilities (outside [0, 1], NaN) give NaN, never a
        # finite loss (log of a negative number is NaN)
        logp = tl.maximum(tl.log(s), -100.0, propagate_nan=tl.PropagateNan.ALL)
        log1mp = tl.maximum(tl.log(1.0 - s), -100.0, propagate_nan=tl.PropagateNan.ALL)
        nll = -(t * logp + (1.0 - t) * log1mp)
        ds = (s - t) / tl.maximum(s * (1.0 - s), 1e-12)
        dt = log1mp - logp
        dsig = ds
    elif LIKELIHOOD == 2:  # GAUSSIAN
        z = (s - t) * inv_sigma
        nll = 0.5 * z * z + log_norm
        ds = z * inv_sigma
        dt = -ds
        dsig = (1.0 - z * z) * inv_sigma
    else:  # CONT_BERNOULLI
        nll, ds, e = _bce_logits(s, t)
        log_c, dlog_c = _cb_log_norm(s, e)
        nll = nll - log_c
        ds = ds - dlog_c
        dt = -s
        dsig = ds
    return nll, ds, dt, dsig


@triton.jit
def gaussian_kl(mu, lv):
    """(kl, d kl / d mu, d kl / d lv) of one latent: 0.5 (mu^2 + e^lv - 1 - lv)."""
    v = tl.exp(lv)
    return 0.5 * (mu * mu + v - 1.0 - lv), mu, 0.5 * (v - 1.0)
