"""Fused CPU loops for the fallback: each likelihood's forward and gradient in one pass over memory.

ATen runs one op at a time, so the fallback's exact Bernoulli makes about 15 passes over every row
chunk, and ``torch.compile`` needs a C++ toolchain and compiles for seconds. These loops are
written here as LLVM IR, one per likelihood, and compiled for the host CPU when a likelihood first
needs them (``llvmlite``, the LLVM binding numba is built on, with no C++ toolchain: on this
project's 2-core EPYC 0.03 s to import and about 0.1 s to compile a likelihood's loops). Each row
is read once: the loop writes ``d recon`` (times the reduction's scale) and the row's NLL sum in
float64 while the element is in registers. Targets may be float32 or uint8 (read as x / 255, the
same bits as ``torch.div(x, 255.0)``).

The transcendentals are written out (LLVM does not vectorise calls to libm), so they are the same
on every x86 CPU whatever ATen's dispatch level:

* ``e = exp(-|s|)`` by Cody-Waite reduction, ``-|s| = n ln 2 + r`` with |r| <= ln 2 / 2, and
  Cephes' degree-7 polynomial for ``e^r`` (about 1 ulp), scaled by ``2^n`` through the exponent
  bits in two halves (so subnormal results round once); below -104 the result is 0 (or NaN for
  NaN);
* ``log(1 + e)`` for e in [0, 1] as ``2 atanh(w)``, ``w = e / (2 + e)`` in [0, 1/3]:
  ``2 (w + w^3/3 + ... + w^15/15)``, truncated below 5e-10 relative, with no cancellation for
  tiny e (the same series as the Triton kernels' ``_log1p_small``);

and the Bernoulli on logits is, per element (h = [s > 0], q = e / (1 + e) = sigmoid(-|s|))::

    nll   = s (h - t) + log(1 + e)          s (h - t) = relu(s) - s t >= 0 for t in [0, 1]
    d / ds = (h - t) + q (1 - 2 h)          = sigmoid(s) - t, no cancellation when confident

the Gaussian with a number sigma ``(s - t)^2`` summed in float64 (each square exact there) and
``d / ds = ks (s - t)``. The KL's rows are narrow (L = 20): a loop 16 lanes wide per row would
leave 4 of 20 elements to scalar code, so its loop first writes ``h = expm1(logvar)`` over the
flat array, then sums each row from h (the same arithmetic and bits; 2-2.7x faster at B = 4096).

A reduced loss takes its four totals from the float64 rows in one more call (:func:`totals`),
where ATen would take six small ops (about 40-50 us of a 400 us call at B = 128 on this
project's 2-core EPYC). The common case, a reduced float32 loss without free bits, runs whole
through :func:`elbo`: the likelihood's loop, the KL's and the totals, three compiled calls with no
ATen op between them and three tensors made (the rows of both sums share one buffer).

Row sums accumulate in float64 over 16 lanes in a fixed order (the loop is vectorised 16 wide on
every CPU: two 8-float registers with AVX2, one with AVX-512), so the loss is bitwise reproducible,
whatever the thread count: rows are split between threads, never a row's sum. The threads are
torch's own OpenMP team (``GOMP_parallel`` of the OpenMP runtime torch loaded, as in the C++ that
``torch.compile`` writes), ``torch.get_num_threads()`` of them. Other threads would find torch's
idle OpenMP workers spinning on the cores after each ATen op: on 2 cores at B = 4096, two Python
threads (ctypes releases the GIL) ran the Bernoulli loop in 3.4-5.3 ms (median) alone and
5.8-6.0 ms right after an ATen op, where one thread took 5.6-5.8 ms; torch's team takes 2.9-3.0 ms
either way. Without an OpenMP runtime the loops run on one thread.

``FASTVAE_CPU_LOOPS=0`` (read at import) turns the loops off: the fallback then runs its ATen
formulation (also used for float64, half inputs, other strides, under ``torch.compile`` tracing
and ``torch.func``, and where llvmlite is missing).
"""
from __future__ import annotations

import ctypes
import math
import os
import struct
import threading

import torch
from torch import Tensor

from . import _memory

ENABLED = os.environ.get("FASTVAE_CPU_LOOPS", "1") != "0"

# the loops' vector width and the number of float64 partial sums of a row: fixed, so the loss's
# bits do not depend on the CPU's vector registers
_WIDTH = 16
# rows are split between threads only above this many elements (ATen's own grain is 32768)
_PARALLEL_MIN = 1 << 16


def _c(v: float) -> str:
    """An fp32 constant as LLVM IR writes it: the double of the float's value, in hex."""
    v32 = struct.unpack("f", struct.pack("f", v))[0]
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", v32))[0]


class _IR:
    """Straight-line IR for one element, one SSA value per call."""

    def __init__(self, prefix: str = "v"):
        self.lines: list[str] = []
        self.n = 0
        self.prefix = prefix

    def __call__(self, expr: str) -> str:
        self.n += 1
        name = f"%{self.prefix}{self.n}"
        self.lines.append(f"  {name} = {expr}")
        return name

    def fma(self, a, b, c):  # a * b + c, fused where the CPU has FMA
        return self(f"call float @llvm.fmuladd.f32(float {a}, float {b}, float {c})")

    def horner(self, x, coefficients):  # sum_k c_k x^(K-k), coefficients highest first
        p = _c(coefficients[0])
        for c in coefficients[1:]:
            p = self.fma(p, x, _c(c))
        return p


# Cephes' expf on [-ln2/2, ln2/2]: e^r = 1 + r + r^2 P(r), highest first
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
          5.0000001201e-1)
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4   # ln 2 = hi + lo, hi with few bits: n * hi exact
_LOG2E = 1.4426950408889634


def _clamp_below(b: _IR, x: str, lowest: float) -> str:
    """max(x, lowest), NaN staying NaN (an ordered compare is false for NaN)."""
    low = b(f"fcmp olt float {x}, {_c(lowest)}")
    return b(f"select i1 {low}, float {_c(lowest)}, float {x}")


def _reduce_ln2(b: _IR, x: str) -> tuple[str, str]:
    """(n, r) with x = n ln 2 + r, n = rint(x / ln 2) as a float and |r| <= ln 2 / 2 (Cody-Waite:
    r = x - n ln 2 in two steps, n ln 2_hi exact)."""
    n = b(f"call float @llvm.rint.f32(float {b(f'fmul float {x}, {_c(_LOG2E)}')})")
    r = b.fma(n, _c(-_LN2_HI), x)
    return n, b.fma(n, _c(-_LN2_LO), r)


def _pow2_halves(b: _IR, n: str, lowest: float) -> tuple[str, str]:
    """(2^k1, 2^k2), k1 + k2 = max(n, lowest), each half a normal float (bits (k + 127) << 23)
    while |n| <= 252: their product scales a result with one rounding, into subnormals too. n is
    clamped first, so NaN never reaches the integer conversion."""
    ni = b(f"fptosi float {b(f'call float @llvm.maxnum.f32(float {n}, float {_c(lowest)})')} to i32")
    k1 = b(f"ashr i32 {ni}, 1")
    k2 = b(f"sub i32 {ni}, {k1}")
    p1, p2 = (b(f"bitcast i32 {b(f'shl i32 {b(k)}, 23')} to float")
              for k in (f"add i32 {k1}, 127", f"add i32 {k2}, 127"))
    return p1, p2


def _exp_neg_abs(b: _IR, s: str) -> str:
    """e = exp(-|s|) in [0, 1] (NaN for NaN): (1 + r + r^2 P(r)) 2^n, n in [-150, 0] (the result is
    NaN through r for NaN); below -104 (e^-104 < half the least subnormal) the clamp gives 0."""
    x = _clamp_below(b, b(f"fneg float {b(f'call float @llvm.fabs.f32(float {s})')}"), -104.0)
    n, r = _reduce_ln2(b, x)
    er = b(f"fadd float {b.fma(b.horner(r, _EXP_P), b(f'fmul float {r}, {r}'), r)}, 1.0")
    p1, p2 = _pow2_halves(b, n, -150.0)
    return b(f"fmul float {b(f'fmul float {er}, {p1}')}, {p2}")


def _two_atanh(b: _IR, w: str, last: int) -> str:
    """2 atanh(w) = 2w + 2w z (1/3 + z/5 + ... + z^k / last), z = w^2 (odd ``last``)."""
    w2 = b(f"fadd float {w}, {w}")
    z = b(f"fmul float {w}, {w}")
    p = b.horner(z, tuple(1 / k for k in range(last, 1, -2)))
    return b.fma(b(f"fmul float {w2}, {z}"), p, w2)


def _log1p_small(b: _IR, e: str) -> str:
    """log(1 + e) for e in [0, 1]: 2 atanh(w), w = e / (2 + e) (see the module docstring)."""
    w = b(f"fdiv float {e}, {b(f'fadd float {e}, 2.0')}")
    return _two_atanh(b, w, 15)


def _bernoulli_logits(b: _IR, s: str, t: str, scale: str):
    """(nll as double, d / ds times scale) of BCE with logits (module docstring)."""
    e = _exp_neg_abs(b, s)
    pos = b(f"fcmp ogt float {s}, 0.0")
    ht = b(f"fsub float {b(f'select i1 {pos}, float 1.0, float 0.0')}, {t}")
    log1p_e = _log1p_small(b, e)
    # s (h - t) + log1p(e), with s (h - t) = 0 where h = t: the same bits for a finite s, and the
    # limit at s = +-inf (where inf * 0 would be NaN)
    nll = b(f"select i1 {b(f'fcmp oeq float {ht}, 0.0')}, float {log1p_e}, float {b.fma(s, ht, log1p_e)}")
    q = b(f"fdiv float {e}, {b(f'fadd float {e}, 1.0')}")
    d = b.fma(q, b(f"select i1 {pos}, float -1.0, float 1.0"), ht)   # (h - t) + q (1 - 2h)
    return b(f"fpext float {nll} to double"), b(f"fmul float {d}, {scale}")


def _gaussian(b: _IR, s: str, t: str, scale: str):
    """((s - t)^2 as double, exact; ks (s - t)) of the Gaussian with a number sigma."""
    r = b(f"fsub float {s}, {t}")
    rd = b(f"fpext float {r} to double")
    return b(f"fmul double {rd}, {rd}"), b(f"fmul float {r}, {scale}")


_LN2 = 0.6931471805599453
_SQRT2 = 1.4142135623730951


def _log(b: _IR, x: str) -> str:
    """log(x) for x >= 1 (+inf for +inf): x = 2^k m with m in [sqrt(1/2), sqrt(2)) from the
    exponent bits, log m = 2 atanh(u), u = (m - 1) / (m + 1), |u| <= 0.172: 2 (u + u^3/3 + ... +
    u^11/11), truncated below 5e-11; log x = k ln 2 + log m (ln 2 in two parts, k ln 2_hi exact)."""
    bits = b(f"bitcast float {x} to i32")
    k = b(f"sub i32 {b(f'lshr i32 {bits}, 23')}, 127")
    mantissa = b(f"and i32 {bits}, 8388607")
    m = b(f"bitcast i32 {b(f'or i32 {mantissa}, 1065353216')} to float")           # in [1, 2)
    big = b(f"fcmp ogt float {m}, {_c(_SQRT2)}")
    m = b(f"select i1 {big}, float {b(f'fmul float {m}, 0.5')}, float {m}")
    carry = b(f"zext i1 {big} to i32")
    k = b(f"sitofp i32 {b(f'add i32 {k}, {carry}')} to float")
    u = b(f"fdiv float {b(f'fsub float {m}, 1.0')}, {b(f'fadd float {m}, 1.0')}")
    log_m = _two_atanh(b, u, 11)
    r = b.fma(k, _c(_LN2_LO), log_m)
    r = b.fma(k, _c(_LN2_HI), r)
    inf = b(f"fcmp oeq float {x}, 0x7FF0000000000000")
    return b(f"select i1 {inf}, float 0x7FF0000000000000, float {r}")


# the continuous Bernoulli's series below |s| = 0.75 in z = s^2, highest first, shared with the
# fallback's ATen formulation (fastvae/_fallback.py has their derivation and truncation):
# (log C - log 2) / z and (d log C / ds) / |s|
CB_LOG_C = (-1414477.0 / 1915538625.0 / 4096, 146.0 / 66825.0 / 1024, -127.0 / 18900.0 / 256,
            62.0 / 2835.0 / 64, -7.0 / 90.0 / 16, 1.0 / 3.0 / 4)
CB_DLOG_C = (-1414477.0 / 653837184000.0, 73.0 / 3421440.0, -127.0 / 604800.0, 31.0 / 15120.0,
             -7.0 / 360.0, 1.0 / 6.0)
CB_SERIES_BELOW = 0.75


def _continuous_bernoulli(b: _IR, s: str, t: str, scale: str):
    """(bce - (log C - log 2) as double, (d bce - d log C) times scale) of the continuous
    Bernoulli on logits, log C(s) = log(s / tanh(s/2)) (the caller takes the rows' D log 2 away):
    below |s| = 0.75 log C - log 2 and d log C / ds from their series in z = s^2, above from the
    closed forms with a = |s| and e = e^-a <= 0.47 (as the ATen formulation, fastvae/_fallback.py):
        log C - log 2 = log(a (1 + e) / (2 (1 - e))),   d log C / ds = sign(s) (1/a - 2e / (1 - e^2))
    NaN stays NaN (through the bce); s = +-inf gives -inf where the pixel is matched (bce 0),
    else NaN, as inf - inf."""
    nll, d = _bernoulli_logits(b, s, t, "1.0")
    a = b(f"call float @llvm.fabs.f32(float {s})")
    small = b(f"fcmp olt float {a}, {_c(CB_SERIES_BELOW)}")
    a_small = b(f"select i1 {small}, float {a}, float {_c(CB_SERIES_BELOW)}")
    a_big = b(f"select i1 {small}, float {_c(CB_SERIES_BELOW)}, float {a}")
    z = b(f"fmul float {a_small}, {a_small}")
    e = _exp_neg_abs(b, a_big)
    w = b(f"fadd float {e}, 1.0")                                   # 1 + e
    m2 = b.fma(e, _c(-2.0), "2.0")                                  # 2 (1 - e)
    big = _log(b, b(f"fdiv float {b(f'fmul float {a_big}, {w}')}, {m2}"))
    q = b(f"fdiv float {e}, {b(f'fmul float {m2}, {w}')}")          # e / (2 (1 - e^2))
    big_d = b.fma(q, _c(-4.0), b(f"fdiv float 1.0, {a_big}"))
    series = b(f"fmul float {b.horner(z, CB_LOG_C)}, {z}")
    log_c = b(f"select i1 {small}, float {series}, float {big}")
    series_d = b(f"fmul float {b.horner(z, CB_DLOG_C)}, {a_small}")
    d_abs = b(f"select i1 {small}, float {series_d}, float {big_d}")
    neg = b(f"fcmp olt float {s}, 0.0")
    d_log_c = b(f"select i1 {neg}, float {b(f'fneg float {d_abs}')}, float {d_abs}")
    nll = b(f"fsub double {nll}, {b(f'fpext float {log_c} to double')}")
    return nll, b(f"fmul float {b(f'fsub float {d}, {d_log_c}')}, {scale}")


# expm1 on |r| <= ln 2 / 2: r + r^2 (1/2 + r/6 + ... + r^6/8!) (Taylor, truncated below 2e-10
# relative), highest first
_EXPM1_P = tuple(1.0 / math.factorial(k) for k in range(8, 1, -1))


def _expm1(b: _IR, x: str) -> str:
    """e^x - 1 without cancellation near 0: x = n ln 2 + r, |r| <= ln 2 / 2, p = e^r - 1 from its
    series, then 2^n p + (2^n - 1) (2^n - 1 exact for |n| <= 24); from n = 25 up e^x itself
    ((1 + p) 2^n in two halves, inf above 88.7), as -1 is below its rounding. x is clamped below
    at -30 (e^x - 1 rounds to -1 there); NaN stays NaN."""
    x = _clamp_below(b, x, -30.0)
    high = b(f"fcmp ogt float {x}, {_c(100.0)}")
    x = b(f"select i1 {high}, float {_c(100.0)}, float {x}")     # inf either way, n stays <= 145
    n, r = _reduce_ln2(b, x)
    p = b.fma(b(f"fmul float {r}, {r}"), b.horner(r, _EXPM1_P), r)  # e^r - 1
    p1, p2 = _pow2_halves(b, n, -64.0)
    two_n = b(f"fmul float {p1}, {p2}")                             # 2^n, exact while n <= 127
    small = b.fma(two_n, p, b(f"fsub float {two_n}, 1.0"))         # 2^n p + (2^n - 1)
    er = b(f"fadd float {p}, 1.0")                                  # e^r
    big = b(f"fmul float {b(f'fmul float {er}, {p1}')}, {p2}")
    return b(f"select i1 {b(f'fcmp oge float {n}, 25.0')}, float {big}, float {small}")


def _gaussian_kl_value(b: _IR, v: str, mu: str, h: str) -> str:
    """h - v + mu^2 as double: the Gaussian KL times 2, from h = e^v - 1."""
    md = b(f"fpext float {mu} to double")
    hv = b(f"fsub double {b(f'fpext float {h} to double')}, {b(f'fpext float {v} to double')}")
    return b(f"call double @llvm.fmuladd.f64(double {md}, double {md}, double {hv})")


def _gaussian_kl(b: _IR, v: str, mu: str, scale: str):
    """(h - v + mu^2 as double, h) of the Gaussian KL times 2, with h = e^v - 1 (d KL / d logvar
    times 2): ``s`` is logvar, ``t`` is mu; ``scale`` is unused (h is stored as it is)."""
    h = _expm1(b, v)
    return _gaussian_kl_value(b, v, mu, h), h


_ELEMENTS = {"bernoulli_logits": _bernoulli_logits, "gaussian": _gaussian,
             "continuous_bernoulli": _continuous_bernoulli, "gaussian_kl": _gaussian_kl}

# Elements whose rows are narrow (the KL's L = 20): a loop 16 lanes wide per row leaves 4 of 20
# elements to scalar code, where the whole transcendental runs one element at a time (the KL, one
# pass: 190 us at B = 4096 with 1 thread, against 80 us for the same loop over the flat array).
# With a gradient their loop makes two passes (see _kernel): d = store(s) over the flat array,
# then the row sums of value(s, t, d); the same arithmetic, so the same bits.
_TWO_PASS = {"gaussian_kl": (_expm1, _gaussian_kl_value)}


def _row_pointers(row: str, strides, t_ty: str, names) -> str:
    """IR: ``names`` = pointers to row ``row`` of s, t and d, whose row ``strides`` are given."""
    return "\n".join(
        f"  {n}_off = mul i64 {row}, {st}\n  {n} = getelementptr {ty}, ptr {base}, i64 {n}_off"
        for n, st, ty, base in zip(names, strides, ("float", t_ty, "float"), ("%s", "%t", "%d")))


def _flat_pass(store) -> str:
    """IR blocks ``flat`` .. ``flat_done`` (then on to ``row``): ``d[i, j] = store(s[i, j])`` over
    all R x D elements, as one loop over the flat array when s and d are contiguous (row stride D),
    else row by row."""
    b = _IR("f")
    d = store(b, b("load float, ptr %fsp"))
    body = "\n".join(b.lines)
    return f"""
flat:
  %flat_s = icmp eq i64 %s_row, %D
  %flat_d = icmp eq i64 %d_row, %D
  %flat_sd = and i1 %flat_s, %flat_d
  %RD = mul i64 %R, %D
  %fR = select i1 %flat_sd, i64 1, i64 %R
  %fD = select i1 %flat_sd, i64 %RD, i64 %D
  br i1 %any_cols, label %frow, label %flat_done
frow:
  %fi = phi i64 [0, %flat], [%fi_next, %frow_end]
{_row_pointers("%fi", ("%s_row", "%t_row", "%d_row"), "float", ("%fsrow", "%ftrow", "%fdrow"))}
  br label %fcol
fcol:
  %fj = phi i64 [0, %frow], [%fj_next, %fcol]
  %fsp = getelementptr float, ptr %fsrow, i64 %fj
{body}
  %fdq = getelementptr float, ptr %fdrow, i64 %fj
  store float {d}, ptr %fdq
  %fj_next = add nuw nsw i64 %fj, 1
  %fmore_cols = icmp slt i64 %fj_next, %fD
  br i1 %fmore_cols, label %fcol, label %frow_end, !llvm.loop !0
frow_end:
  %fi_next = add nuw nsw i64 %fi, 1
  %fmore_rows = icmp slt i64 %fi_next, %fR
  br i1 %fmore_rows, label %frow, label %flat_done
flat_done:
  br label %row
"""


# The Gaussian's loop is cheap per element, and from memory it ran at half the speed of an ATen op
# with the same traffic: its row pass asks for the s and t of a row this many elements ahead
# (rounded up to whole rows, at least the next one: two rows of 784) before it reads its own. On
# this project's AMD EPYC (Zen 5) its loop over a batch of 4096 x 784 from memory took 1.18 ms
# without it and 0.66 ms with it (1 thread, the same bits); d, which the loop writes, is better left
# to the hardware (0.78 ms when it was prefetched for writing too), and so is the next row alone
# (0.72 ms), or three (0.72 ms). Cached batches (B = 128) take the same time either way. The other
# likelihoods' loops are bound by their arithmetic: there the prefetches cost 1.5-2.5% (B = 4096,
# whole calls).
_PREFETCH_AHEAD = 1024
_PREFETCHED = {"gaussian"}


def _prefetch_rows(t_ty: str, prefetch: bool) -> str:
    """IR blocks ``pf`` .. ``pf_done`` (within the row pass, after row i's pointers): where
    ``prefetch``, ask for each 64-byte line of row i + ahead of s and t (where that row exists),
    one ``llvm.prefetch`` per 16 columns (the lines of a float row; a uint8 row's lines are asked
    for four times, which costs nothing more than a few instructions); else nothing."""
    if not prefetch:
        return "  br label %pf_done\npf_done:"
    return f"""  %pf_row = add i64 %i, %ahead
  %pf_in = icmp slt i64 %pf_row, %R
  %pf_any = and i1 %pf_in, %any_cols
  br i1 %pf_any, label %pf, label %pf_done
pf:
  %pk = phi i64 [0, %row], [%pk_next, %pf]
  %pso = mul i64 %pf_row, %s_row
  %pso_k = add i64 %pso, %pk
  %psp = getelementptr float, ptr %s, i64 %pso_k
  call void @llvm.prefetch.p0(ptr %psp, i32 0, i32 3, i32 1)
  %pto = mul i64 %pf_row, %t_row
  %pto_k = add i64 %pto, %pk
  %ptp = getelementptr {t_ty}, ptr %t, i64 %pto_k
  call void @llvm.prefetch.p0(ptr %ptp, i32 0, i32 3, i32 1)
  %pk_next = add nuw nsw i64 %pk, 16
  %pk_more = icmp slt i64 %pk_next, %D
  br i1 %pk_more, label %pf, label %pf_done
pf_done:"""


def _kernel(name: str, element, target: str, grad: bool, two_pass=None, prefetch: bool = False) -> str:
    """``void name(s, t, d, rows, R, D, s_row, t_row, d_row, scale, row_mul, row_add)``: for each
    of R rows of D elements (unit column stride, row strides in elements), ``rows[i]`` = the row's
    float64 sum of the element's first value, times ``row_mul`` then plus ``row_add`` (two float64
    roundings, as two ATen ops would make them), and, if ``grad``, ``d[i, j]`` = its second.

    ``two_pass`` = (store, value), with ``grad``: a flat pass writes ``d = store(s)`` first
    (:func:`_flat_pass`), then the row pass sums ``value(s, t, d)``, reading d back while the
    rows are in cache; the element is ``value(s, t, store(s))`` either way. ``prefetch``: the row
    pass asks for later rows of s and t ahead of reading them (see _PREFETCH_AHEAD)."""
    b = _IR()
    x = b("load float, ptr %sp")
    if target == "u8":  # uint8 x read as x / 255, as torch.div(x, 255.0)
        y = b(f"fdiv float {b('uitofp i8 %tb to float')}, {_c(255.0)}")
    else:
        y = b("load float, ptr %tp")
    two_pass = two_pass if grad else None
    if two_pass is None:
        val, d = element(b, x, y, "%scale")
    else:
        val, d = two_pass[1](b, x, y, b("load float, ptr %dq")), None
    t_ty = "i8" if target == "u8" else "float"
    t_load = "  %tb = load i8, ptr %tp\n" if target == "u8" else ""
    ahead = _prefetch_rows(t_ty, prefetch)
    dq = "  %dq = getelementptr float, ptr %drow, i64 %j\n" if grad else ""
    store = f"  store float {d}, ptr %dq\n" if d is not None and grad else ""
    body = "\n".join(b.lines)
    first = "row" if two_pass is None else "flat"
    return f"""
define void @{name}(ptr noalias nocapture readonly %s, ptr noalias nocapture readonly %t,
                    ptr noalias nocapture %d, ptr noalias nocapture %rows, i64 %R, i64 %D,
                    i64 %s_row, i64 %t_row, i64 %d_row, float %scale, double %row_mul,
                    double %row_add) nounwind {{
entry:
  %any_rows = icmp sgt i64 %R, 0
  %any_cols = icmp sgt i64 %D, 0
  %D1 = select i1 %any_cols, i64 %D, i64 1
  %ahead_ = udiv i64 {_PREFETCH_AHEAD}, %D1
  %ahead = add i64 %ahead_, 1
  br i1 %any_rows, label %{first}, label %exit
{"" if two_pass is None else _flat_pass(two_pass[0])}row:
  %i = phi i64 [0, %{"entry" if two_pass is None else "flat_done"}], [%i_next, %row_end]
{_row_pointers("%i", ("%s_row", "%t_row", "%d_row"), t_ty, ("%srow", "%trow", "%drow"))}
{ahead}
  br i1 %any_cols, label %col, label %row_end
col:
  %j = phi i64 [0, %pf_done], [%j_next, %col]
  %acc = phi double [0.0, %pf_done], [%acc_next, %col]
  %sp = getelementptr float, ptr %srow, i64 %j
  %tp = getelementptr {t_ty}, ptr %trow, i64 %j
{dq}{t_load}{body}
  %acc_next = fadd reassoc double %acc, {val}
{store}  %j_next = add nuw nsw i64 %j, 1
  %more_cols = icmp slt i64 %j_next, %D
  br i1 %more_cols, label %col, label %row_end, !llvm.loop !0
row_end:
  %sum = phi double [0.0, %pf_done], [%acc_next, %col]
  %sum_mul = fmul double %sum, %row_mul
  %sum_add = fadd double %sum_mul, %row_add
  %rp = getelementptr double, ptr %rows, i64 %i
  store double %sum_add, ptr %rp
  %i_next = add nuw nsw i64 %i, 1
  %more_rows = icmp slt i64 %i_next, %R
  br i1 %more_rows, label %row, label %exit
exit:
  ret void
}}
"""


def _parallel(name: str, t_ty: str) -> str:
    """``void name_par(<name's arguments>, i32 threads)``: name over the rows in torch's OpenMP
    team, thread k of n taking rows [R k / n, R (k + 1) / n)."""
    fields = ", ".join(["ptr"] * 4 + ["i64"] * 5 + ["float", "double", "double"])
    return f"""
define internal void @{name}_omp(ptr %a) nounwind {{
  %sp = getelementptr {{{fields}}}, ptr %a, i32 0, i32 0
  %tp = getelementptr {{{fields}}}, ptr %a, i32 0, i32 1
  %dp = getelementptr {{{fields}}}, ptr %a, i32 0, i32 2
  %rp = getelementptr {{{fields}}}, ptr %a, i32 0, i32 3
  %Rp = getelementptr {{{fields}}}, ptr %a, i32 0, i32 4
  %Dp = getelementptr {{{fields}}}, ptr %a, i32 0, i32 5
  %ssp = getelementptr {{{fields}}}, ptr %a, i32 0, i32 6
  %tsp = getelementptr {{{fields}}}, ptr %a, i32 0, i32 7
  %dsp = getelementptr {{{fields}}}, ptr %a, i32 0, i32 8
  %scp = getelementptr {{{fields}}}, ptr %a, i32 0, i32 9
  %rmp = getelementptr {{{fields}}}, ptr %a, i32 0, i32 10
  %rap = getelementptr {{{fields}}}, ptr %a, i32 0, i32 11
  %s = load ptr, ptr %sp
  %t = load ptr, ptr %tp
  %d = load ptr, ptr %dp
  %rows = load ptr, ptr %rp
  %R = load i64, ptr %Rp
  %D = load i64, ptr %Dp
  %ss = load i64, ptr %ssp
  %ts = load i64, ptr %tsp
  %ds = load i64, ptr %dsp
  %scale = load float, ptr %scp
  %row_mul = load double, ptr %rmp
  %row_add = load double, ptr %rap
  %k32 = call i32 @omp_get_thread_num()
  %n32 = call i32 @omp_get_num_threads()
  %k = sext i32 %k32 to i64
  %n = sext i32 %n32 to i64
  %k1 = add i64 %k, 1
  %lo_ = mul i64 %R, %k
  %lo = sdiv i64 %lo_, %n
  %hi_ = mul i64 %R, %k1
  %hi = sdiv i64 %hi_, %n
  %r = sub i64 %hi, %lo
{_row_pointers("%lo", ("%ss", "%ts", "%ds"), t_ty, ("%s1", "%t1", "%d1"))}
  %rows1 = getelementptr double, ptr %rows, i64 %lo
  call void @{name}(ptr %s1, ptr %t1, ptr %d1, ptr %rows1, i64 %r, i64 %D, i64 %ss, i64 %ts, i64 %ds, float %scale,
                    double %row_mul, double %row_add)
  ret void
}}

define void @{name}_par(ptr %s, ptr %t, ptr %d, ptr %rows, i64 %R, i64 %D, i64 %ss, i64 %ts,
                        i64 %ds, float %scale, double %row_mul, double %row_add,
                        i32 %threads) nounwind {{
  %a = alloca {{{fields}}}
  %a0 = insertvalue {{{fields}}} poison, ptr %s, 0
  %a1 = insertvalue {{{fields}}} %a0, ptr %t, 1
  %a2 = insertvalue {{{fields}}} %a1, ptr %d, 2
  %a3 = insertvalue {{{fields}}} %a2, ptr %rows, 3
  %a4 = insertvalue {{{fields}}} %a3, i64 %R, 4
  %a5 = insertvalue {{{fields}}} %a4, i64 %D, 5
  %a6 = insertvalue {{{fields}}} %a5, i64 %ss, 6
  %a7 = insertvalue {{{fields}}} %a6, i64 %ts, 7
  %a8 = insertvalue {{{fields}}} %a7, i64 %ds, 8
  %a9 = insertvalue {{{fields}}} %a8, float %scale, 9
  %a10 = insertvalue {{{fields}}} %a9, double %row_mul, 10
  %a11 = insertvalue {{{fields}}} %a10, double %row_add, 11
  store {{{fields}}} %a11, ptr %a
  call void @GOMP_parallel(ptr @{name}_omp, ptr %a, i32 %threads, i32 0)
  ret void
}}
"""


_OPENMP_HEADER = """
declare i32 @omp_get_thread_num()
declare i32 @omp_get_num_threads()
declare void @GOMP_parallel(ptr, ptr, i32, i32)
"""

_HEADER = f"""
declare float @llvm.fabs.f32(float)
declare float @llvm.rint.f32(float)
declare float @llvm.maxnum.f32(float, float)
declare float @llvm.fmuladd.f32(float, float, float)
declare double @llvm.fmuladd.f64(double, double, double)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
!0 = distinct !{{!0, !1, !2, !3}}
!1 = !{{!"llvm.loop.vectorize.width", i32 {_WIDTH}}}
!2 = !{{!"llvm.loop.vectorize.enable", i1 true}}
!3 = !{{!"llvm.loop.interleave.count", i32 1}}
"""

_SIGNATURE = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 4), *([ctypes.c_int64] * 5), ctypes.c_float,
                              ctypes.c_double, ctypes.c_double)
_PAR_SIGNATURE = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 4), *([ctypes.c_int64] * 5), ctypes.c_float,
                                  ctypes.c_double, ctypes.c_double, ctypes.c_int32)
_OPENMP_SYMBOLS = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")

_lock = threading.RLock()  # reentrant: a build under it looks up the OpenMP runtime through _once
_state: dict = {}


def _once(key, make, *args):
    """``_state[key]``, made by ``make(*args)`` on first use (once, whatever the threads)."""
    value = _state.get(key, False)
    if value is False:
        with _lock:
            value = _state.get(key, False)
            if value is False:
                value = _state[key] = make(*args)
    return value


def _names(element: str, target: str):
    for grad in (False, True):
        yield grad, f"{element}_{target}{'_grad' if grad else ''}"


def _openmp() -> dict | None:
    """The addresses of the OpenMP entry points in the runtime torch loaded (GNU libgomp, or a
    runtime that provides its GOMP_ interface: LLVM's libomp, Intel's libiomp5), or None."""
    if torch.__config__.parallel_info().find("parallel backend: OpenMP") < 0:
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith((".so", ".so.1", ".so.5"))}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        if any(k in os.path.basename(path) for k in ("libgomp", "libiomp5", "libomp")):
            try:
                lib = ctypes.CDLL(path)  # already loaded by torch: the same runtime, the same team
                return {n: ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in _OPENMP_SYMBOLS}
            except (OSError, AttributeError):
                continue
    return None


def _compile(source: str, omp: dict | None):
    """``source`` (LLVM IR) compiled for the host CPU: its execution engine, or None where
    llvmlite is missing or fails. The engine is kept: the code lives with it."""
    try:
        import llvmlite.binding as llvm
    except ImportError:
        return None
    try:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        if omp is not None:
            for name, address in omp.items():
                llvm.add_symbol(name, address)
        module = llvm.parse_assembly(source)
        module.verify()
        machine = llvm.Target.from_default_triple().create_target_machine(
            cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3)
        options = llvm.create_pipeline_tuning_options(speed_level=3)
        options.loop_vectorization = True
        builder = llvm.create_pass_builder(machine, options)
        builder.getModulePassManager().run(module, builder)
        engine = llvm.create_mcjit_compiler(module, machine)
        engine.finalize_object()
    except Exception:  # an llvmlite whose API differs: the ATen formulation serves
        return None
    _state.setdefault("keep", []).append((engine, module, machine))
    return engine


def _build(element: str, target: str):
    """Compile ``element``'s loops for targets ``target`` ("f32" or "u8") for the host CPU:
    {grad: (ctypes function, its OpenMP-parallel twin or None)}, or None where llvmlite is
    missing or fails."""
    omp = _once("omp", _openmp)
    t_ty = "i8" if target == "u8" else "float"
    source = _HEADER + "".join(_kernel(name, _ELEMENTS[element], target, g, _TWO_PASS.get(element),
                                       element in _PREFETCHED)
                               for g, name in _names(element, target))
    if omp is not None:
        source += _OPENMP_HEADER + "".join(_parallel(name, t_ty) for g, name in _names(element, target))
    engine = _compile(source, omp)
    if engine is None:
        return None
    return {g: (_SIGNATURE(engine.get_function_address(name)),
                None if omp is None else _PAR_SIGNATURE(engine.get_function_address(name + "_par")))
            for g, name in _names(element, target)}


# ---- the batch's totals ------------------------------------------------------------------------

_TOTALS_IR = _HEADER + """
define void @totals(ptr noalias nocapture readonly %a, ptr noalias nocapture readonly %b, i64 %R,
                    double %div, double %beta, ptr noalias nocapture %loss, ptr noalias %ra,
                    ptr noalias %rb, ptr noalias %rb2) nounwind {
entry:
  %any = icmp sgt i64 %R, 0
  br i1 %any, label %loop, label %done
loop:
  %i = phi i64 [0, %entry], [%i_next, %loop]
  %acc_a = phi double [0.0, %entry], [%acc_a_next, %loop]
  %acc_b = phi double [0.0, %entry], [%acc_b_next, %loop]
  %pa = getelementptr double, ptr %a, i64 %i
  %pb = getelementptr double, ptr %b, i64 %i
  %va = load double, ptr %pa
  %vb = load double, ptr %pb
  %acc_a_next = fadd reassoc double %acc_a, %va
  %acc_b_next = fadd reassoc double %acc_b, %vb
  %i_next = add nuw nsw i64 %i, 1
  %more = icmp slt i64 %i_next, %R
  br i1 %more, label %loop, label %done, !llvm.loop !0
done:
  %sa = phi double [0.0, %entry], [%acc_a_next, %loop]
  %sb = phi double [0.0, %entry], [%acc_b_next, %loop]
  %ta = fdiv double %sa, %div
  %tb = fdiv double %sb, %div
  %beta_tb = fmul double %beta, %tb
  %sum = fadd double %ta, %beta_tb
  %no_kl = fcmp oeq double %beta, 0.0
  %l = select i1 %no_kl, double %ta, double %sum
  %lf = fptrunc double %l to float
  %taf = fptrunc double %ta to float
  %tbf = fptrunc double %tb to float
  store float %lf, ptr %loss
  %terms = icmp ne ptr %ra, null
  br i1 %terms, label %store_terms, label %end
store_terms:
  store float %taf, ptr %ra
  store float %tbf, ptr %rb
  store float %tbf, ptr %rb2
  br label %end
end:
  ret void
}
"""
_TOTALS_SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double,
                                     ctypes.c_double, *([ctypes.c_void_p] * 4))


def _build_totals():
    """The compiled :func:`totals` (ctypes), or None where llvmlite is missing or fails."""
    engine = _compile(_TOTALS_IR, None)
    return None if engine is None else _TOTALS_SIGNATURE(engine.get_function_address("totals"))


def totals(rec: Tensor, kl: Tensor, div: float, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The four reduced terms of the ELBO from its float64 rows ``rec`` and ``kl`` ([R], contiguous,
    CPU), in one call where ATen takes six ops: float32 0-dim tensors (loss, reconstruction, kl,
    kl again, four distinct tensors) of ``A = sum(rec) / div``, ``K = sum(kl) / div`` and the loss
    ``A + beta K`` (``A`` when beta is 0, so that an infinite KL does not reach it), each summed in
    float64 (16 lanes, a fixed order) and rounded once. None where the loops are off or do not
    compile (then the caller's ATen ops serve)."""
    if not ENABLED or _once("totals", _build_totals) is None:
        return None
    return _totals(rec.data_ptr(), kl.data_ptr(), rec.shape[0], div, beta, True)


def _totals(rec: int, kl: int, R: int, div: float, beta: float, terms: bool) -> tuple[Tensor, ...]:
    """:func:`totals` on the addresses of the rows: the four terms, or the loss alone (a 1-tuple)
    where ``terms`` is False (the other three are not written)."""
    out = tuple(torch.empty((), dtype=torch.float32) for _ in range(4 if terms else 1))
    ptrs = [t.data_ptr() for t in out] if terms else (out[0].data_ptr(), None, None, None)
    _state["totals"](rec, kl, R, div, beta, *ptrs)
    return out


def _functions(element: str = "bernoulli_logits", target: str = "f32"):
    """``element``'s compiled loops for ``target`` (see :func:`_build`), compiled on first use."""
    return _once((element, target), _build, element, target)


def available() -> bool:
    """Whether the loops are on and compile (compiles the Bernoulli's and :func:`totals` on the
    first call)."""
    return ENABLED and _functions() is not None and _once("totals", _build_totals) is not None


# torch.func's check for its wrapper tensors (absent from some torch builds): looked up once
_FUNCTORCH_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def _plain(t: Tensor) -> bool:
    """A real CPU tensor whose memory the loop may read (a Parameter too): not another tensor
    subclass (FakeTensor under tracing) nor a torch.func wrapper, no lazy negation."""
    return ((type(t) is Tensor or type(t) is torch.nn.Parameter) and t.is_cpu
            and t.layout == torch.strided and not t.is_neg()
            and not (_FUNCTORCH_WRAPPED is not None and _FUNCTORCH_WRAPPED(t)))


def takes(s: Tensor, t: Tensor) -> bool:
    """Whether the loops can run on decoder outputs ``s`` and targets ``t`` ([R, D], CPU): s
    float32, t float32 or uint8 of the same shape, both with unit column stride; not under
    ``torch.compile`` tracing. (Compiles the loops on the first positive answer.)"""
    if not ENABLED or torch.compiler.is_compiling():
        return False
    if s.dim() != 2 or s.dtype != torch.float32 or t.dtype not in (torch.float32, torch.uint8):
        return False
    if t.shape != s.shape or not (_plain(s) and _plain(t)):
        return False
    if s.shape[1] > 1 and (s.stride(1) != 1 or t.stride(1) != 1):
        return False
    return available()


def run(element: str, s: Tensor, t: Tensor, d: Tensor | None, scale: float, row_mul: float = 1.0,
        row_add: float = -0.0) -> Tensor:
    """The float64 row sums [R] of ``element``'s first value over ``s``, ``t`` (see
    :func:`takes`), each times ``row_mul`` then plus ``row_add`` (the defaults change no bit:
    -0.0 is the exact identity of addition), and, when ``d`` (float32 [R, D], unit column
    stride) is given, its second value written into d. ``scale`` multiplies the second value
    (fp32)."""
    R, D = s.shape
    if d is not None and (d.dtype != torch.float32 or d.shape != s.shape or not _plain(d)
                          or (D > 1 and d.stride(1) != 1)):
        raise ValueError("fastvae internal: the loop's gradient buffer must be float32 [R, D] "
                         "with unit column stride")
    rows = torch.empty(R, dtype=torch.float64)
    _launch(element, s, t, d, rows.data_ptr(), scale, row_mul, row_add)
    return rows


def _launch(element: str, s: Tensor, t: Tensor, d: Tensor | None, rows: int, scale: float,
            row_mul: float, row_add: float) -> None:
    """:func:`run` into the float64 rows at address ``rows``, without checking d (R = 0 runs no
    row: the loops check their bounds, and R x D is below the threshold for threads)."""
    R, D = s.shape
    fns = _functions(element, "u8" if t.dtype == torch.uint8 else "f32")
    if fns is None:
        raise RuntimeError(f"fastvae internal: the {element} loop did not compile")
    serial, parallel = fns[d is not None]
    args = (s.data_ptr(), t.data_ptr(), 0 if d is None else d.data_ptr(), rows,
            R, D, s.stride(0), t.stride(0), 0 if d is None else d.stride(0), scale, row_mul, row_add)
    threads = min(torch.get_num_threads(), R) if R * D >= _PARALLEL_MIN else 1
    if threads > 1 and parallel is not None:
        parallel(*args, threads)
    else:
        serial(*args)


def elbo(element: str, s: Tensor, t: Tensor, d: Tensor | None, scale: float, row_mul: float,
         row_add: float, logvar: Tensor, mu: Tensor, div: float, beta: float,
         terms: bool) -> tuple[tuple[Tensor, ...], Tensor]:
    """A reduced ELBO's whole forward in three compiled calls, with no ATen op between them:
    ``element``'s loop over (s, t) as :func:`run` (d written where given), the KL's loop over
    (logvar, mu) writing ``h = expm1(logvar)``, and the :func:`totals` of both. Returns (the loss,
    or the four terms where ``terms``; h). The caller has checked both pairs with :func:`takes`
    and made d. The rows of both sums share one float64 buffer, so the call makes three
    tensors (rows, h, the loss; six with the four terms) where run, run and totals made seven."""
    R = mu.shape[0]
    rows = torch.empty(2 * R, dtype=torch.float64)
    rec, kl = rows.data_ptr(), rows.data_ptr() + 8 * R
    _launch(element, s, t, d, rec, scale, row_mul, row_add)
    h = _kl_into(logvar, mu, kl)
    return _totals(rec, kl, R, div, beta, terms), h


def kl(logvar: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """The Gaussian KL's float64 rows [R] and ``h = expm1(logvar)`` (see :func:`_kl_into`); the
    caller has checked (logvar, mu) with :func:`takes`."""
    rows = torch.empty(logvar.shape[0], dtype=torch.float64)
    return rows, _kl_into(logvar, mu, rows.data_ptr())


def _kl_into(logvar: Tensor, mu: Tensor, rows: int) -> Tensor:
    """h = expm1(logvar), a new float32 buffer of logvar's shape, with the KL's row sums
    ``0.5 sum(h - logvar + mu^2)`` written as float64 at address ``rows`` (halved in the loop:
    exact)."""
    h = _memory.empty(logvar.shape, torch.float32)
    _launch("gaussian_kl", logvar, mu, h, rows, 1.0, 0.5, -0.0)
    return h
