"""The fallback's fused CPU loops (fastvae/_cpu_loops.py): each element's NLL and gradient against
the float64 oracle over the whole float range, the row sums, targets as uint8, row strides, thread
counts, and when the loops step aside (they are also run by every fallback test through the
``loops`` formulation, see conftest.py)."""
import math

import pytest
import torch

import fastvae
import oracle
from fastvae import _cpu_loops, _fallback

pytestmark = pytest.mark.skipif(not _cpu_loops.available(), reason="llvmlite is not installed")

F32_EPS = 2.0 ** -24


def _logits():
    """Every binade from 1e-30 to 1e30 (both signs, 0, -0), plus the exp's switch points."""
    mags = torch.logspace(-30, 30, 4001, dtype=torch.float64)
    special = torch.tensor([0.0, 15.0, 20.0, 40.0, 86.0, 87.3, 88.0, 88.8, 100.0, 103.3, 103.9, 104.0,
                            104.5, 200.0, 3.4e38], dtype=torch.float64)
    m = torch.cat([mags, special])
    s = torch.cat([m, -m, torch.tensor([-0.0], dtype=torch.float64)]).float()
    return s


def _per_element(element, s, t, scale=1.0):
    """Each element as a row of one: the loop's NLL (its float64 row sum) and gradient."""
    S, T = s.reshape(-1, 1), t.reshape(-1, 1)
    d = torch.empty_like(S)
    rows = _cpu_loops.run(element, S, T, d, scale)
    return rows, d.reshape(-1)


def _bce_oracle(s, t):
    """BCE with logits and sigmoid(s) - t in float64, written from the formulas (the stable form,
    so that softplus's threshold never rounds e^-|s| away)."""
    s, t = s.double(), t.double()
    e = torch.exp(-s.abs())
    nll = s.clamp(min=0) - s * t + torch.log1p(e)
    grad = torch.where(s > 0, (1.0 - t) - e / (1 + e), e / (1 + e) - t)
    return nll, grad


@pytest.mark.parametrize("target", [0.0, 1.0, 0.3])
def test_bernoulli_elements_match_oracle_over_every_binade(target):
    """NLL and gradient of every element within a few fp32 roundings of float64 (relative to the
    value itself, so tiny losses of confident pixels keep their digits), down to subnormals."""
    s = _logits()
    t = torch.full_like(s, target)
    nll, grad = _per_element("bernoulli_logits", s, t)
    ref_nll, ref_grad = _bce_oracle(s, t)
    normal = ref_nll.abs() >= 2.0 ** -126          # fp32 subnormals have absolute resolution only
    rel = ((nll - ref_nll).abs() / ref_nll.abs().clamp(min=1e-300))[normal]
    assert rel.max() <= 4 * F32_EPS, rel.max()
    assert ((nll - ref_nll).abs()[~normal] <= 2.0 ** -149 * 2).all()
    # the gradient (h - t) + q (1 - 2h): within a few roundings of its larger part; for t = 0 or 1
    # (h - t is 0 where the model is right) that is relative to the gradient itself
    err = (grad.double() - ref_grad).abs()
    size = ref_grad.abs() + ((s > 0).double() - target).abs()
    normal = size >= 2.0 ** -126
    assert (err / size.clamp(min=1e-300))[normal].max() <= 4 * F32_EPS
    assert (err[~normal] <= 2.0 ** -149 * 2).all()


def test_bernoulli_special_values():
    """NaN in, NaN out (loss and gradient); +-inf logits give the formula's limit."""
    s = torch.tensor([math.nan, 1.0, math.inf, -math.inf, math.inf, -math.inf])
    t = torch.tensor([1.0, math.nan, 0.0, 1.0, 1.0, 0.0])
    nll, grad = _per_element("bernoulli_logits", s, t)
    assert nll[:2].isnan().all() and grad[:2].isnan().all()
    assert nll[2] == math.inf and nll[3] == math.inf          # confidently wrong: infinite loss
    assert grad[2] == 1.0 and grad[3] == -1.0
    # confidently right at infinity: the limit 0 (inf * 0 in relu(s) - s t would be NaN), as the
    # ATen formulation and the Triton kernel give it (issue 30)
    assert nll[4:].tolist() == [0.0, 0.0] and grad[4:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("target", [0.0, 1.0, 0.3])
def test_continuous_bernoulli_elements_match_oracle(target):
    """NLL = bce - log C per element within a few fp32 roundings of its two parts (they cancel
    near lam = 1/2, where the row sums are float64), and d/ds within a few roundings of its parts:
    for |s| >= 0.75 the closed form 1/a - 1/sinh(a), whose terms are ~1.2 there, plus the series'
    truncation (4.9e-9) below."""
    mags = torch.logspace(-30, 30, 4001, dtype=torch.float64)
    s = torch.cat([mags, -mags, torch.linspace(-3, 3, 6001, dtype=torch.float64),
                   torch.tensor([0.0, 0.7499999, 0.75, 0.7500001], dtype=torch.float64)]).float()
    t = torch.full_like(s, target)
    rows, grad = _per_element("continuous_bernoulli", s, t)
    nll = rows - math.log(2.0)                 # the caller takes D log 2 off the rows
    sd = s.double().requires_grad_()
    ref = oracle._continuous_bernoulli(sd, t.double())
    ref_grad, = torch.autograd.grad(ref.sum(), sd)
    a = sd.detach().abs()
    bce = oracle._bernoulli_logits(sd.detach(), t.double())
    log_c = torch.where(a > 0, oracle.cb_log_norm_closed(torch.where(a > 0, a, 1.0)), math.log(2.0))
    assert ((nll - ref.detach()).abs() <= 4 * F32_EPS * (bce + log_c)).all()
    d_bce = _bce_oracle(s, t)[1].abs()
    d_log_c = torch.where(a < 0.75, (ref_grad - _bce_oracle(s, t)[1]).abs(),
                          1.0 / a + 1.0 / torch.sinh(a.clamp(max=80.0)))
    assert ((grad.double() - ref_grad).abs() <= 4 * F32_EPS * (d_bce + d_log_c) + 5e-9).all()


def test_kl_elements_match_oracle():
    """h = exp(v) - 1 within a few fp32 roundings of float64 over every binade (no cancellation
    near 0, subnormal-free down to v = -30, inf beyond 88.7), and 2 KL = h - v + mu^2 summed in
    float64 from h."""
    mags = torch.logspace(-30, 1, 3001, dtype=torch.float64)
    v = torch.cat([mags, -mags, torch.linspace(-40, 88, 12801, dtype=torch.float64),
                   torch.tensor([0.0, 17.3, 17.4, 88.7, 100.0], dtype=torch.float64)]).float()
    mu = torch.randn(v.shape[0], generator=torch.Generator().manual_seed(6))
    kl2, h = _per_element("gaussian_kl", v, mu)
    ref = torch.expm1(v.double())
    finite = ref < 3.4e38
    assert ((h.double() - ref).abs() <= 4 * F32_EPS * ref.abs())[finite].all()
    assert h[~finite].eq(math.inf).all() and finite[:-1].all()
    want = h.double() - v.double() + mu.double() ** 2
    torch.testing.assert_close(kl2, want, rtol=1e-15, atol=0)
    kl2, h = _per_element("gaussian_kl", torch.tensor([math.nan, -math.inf, math.inf]), torch.zeros(3))
    assert h[0].isnan() and h[1] == -1.0 and h[2] == math.inf
    assert kl2[0].isnan() and kl2[1] == math.inf and kl2[2].isnan()   # inf - inf, as ATen's


def _kl_cases():
    """(logvar, mu, h buffer) for the KL loop: rows of 1, 16, 20 and 37 elements, 0 rows and 0
    columns, batches in serial and OpenMP sizes, contiguous and row-strided inputs and buffers,
    NaN, +-inf and values past the exp's switch points."""
    g = torch.Generator().manual_seed(9)
    for B, L in ((1, 1), (3, 20), (5, 37), (7, 16), (4096, 20), (9, 0), (0, 20)):
        v, mu = 3.0 * torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
        flat = v.view(-1)
        flat[: min(5, flat.numel())] = torch.tensor([math.nan, 100.0, -200.0, math.inf, -math.inf])[: min(5, flat.numel())]
        yield v, mu, torch.empty(B, L)
        wide = torch.cat([v, mu], 1)                                  # row stride 2 L
        yield wide[:, :L], wide[:, L:], torch.empty(B, L)
        yield v, mu, torch.empty(B, 2 * L)[:, L:]


@pytest.mark.parametrize("threads", [1, 2])
def test_kl_two_passes_give_the_one_pass_bits(monkeypatch, threads):
    """The KL's loop with a gradient makes two passes (h over the flat array, then the row sums
    from h): the same bits, rows and h, as the one-pass loop of the other elements, compiled here
    for the comparison, in every layout of _kl_cases."""
    assert "gaussian_kl" in _cpu_loops._TWO_PASS
    two = [(_cpu_loops.run("gaussian_kl", v, mu, h, 1.0, 0.5), h) for v, mu, h in _kl_cases()]
    monkeypatch.setattr(_cpu_loops, "_TWO_PASS", {})
    monkeypatch.setattr(_cpu_loops, "_state", {})                       # compile the one-pass loop
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for (rows, h), (v, mu, h1) in zip(two, _kl_cases()):
            rows1 = _cpu_loops.run("gaussian_kl", v, mu, h1, 1.0, 0.5)
            assert torch.equal(rows.view(torch.int64), rows1.view(torch.int64)), (v.shape, v.stride())
            assert torch.equal(h.view(torch.int32), h1.view(torch.int32)), (v.shape, h.stride())
    finally:
        torch.set_num_threads(before)


def test_gaussian_elements_exact():
    """(s - t)^2 summed in float64 is the square of fp32's s - t, exactly; d = ks (s - t)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3000, generator=g) * torch.logspace(-20, 20, 3000).float()
    t = torch.randn(3000, generator=g)
    sq, d = _per_element("gaussian", s, t, scale=0.37)
    r = (s - t).double()
    assert torch.equal(sq, r * r)
    assert torch.equal(d, (s - t) * 0.37)


@pytest.mark.parametrize("element", ["bernoulli_logits", "gaussian", "continuous_bernoulli"])
def test_rows_match_oracle_and_uint8_targets_equal_floats(element):
    """Row sums over 784 pixels to 1e-6 of the float64 oracle; uint8 targets read as x / 255 give
    the same bits as the float targets torch.div(x, 255.0) makes."""
    g = torch.Generator().manual_seed(1)
    s = 3.0 * torch.randn(1100, 784, generator=g)
    xb = torch.randint(0, 256, (1100, 784), generator=g, dtype=torch.uint8)
    xf = torch.div(xb, 255.0)
    d8, df = torch.empty_like(s), torch.empty_like(s)
    r8 = _cpu_loops.run(element, s, xb, d8, 1.0)
    rf = _cpu_loops.run(element, s, xf, df, 1.0)
    assert torch.equal(r8, rf) and torch.equal(d8, df)
    if element == "gaussian":
        ref = ((s.double() - xf.double()) ** 2).sum(1)
    elif element == "continuous_bernoulli":
        ref = oracle._continuous_bernoulli(s.double(), xf.double()).sum(1) + 784 * math.log(2.0)
    else:
        ref = _bce_oracle(s, xf)[0].sum(1)
    torch.testing.assert_close(rf, ref, rtol=1e-6, atol=0)


def test_bitwise_the_same_for_any_thread_count_and_row_stride():
    """Rows are split between threads, never a row's sum: 1 and 2 threads give the same bits; a
    row-strided view (columns of a wider tensor) gives the contiguous copy's bits."""
    g = torch.Generator().manual_seed(2)
    wide = 2.0 * torch.randn(1500, 900, generator=g)
    s = wide[:, 50:834]
    t = torch.rand(1500, 784, generator=g)
    assert s.stride(0) == 900 and s.shape[0] * s.shape[1] >= _cpu_loops._PARALLEL_MIN
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            d = torch.full((1500, 784), math.nan)  # every element must be written
            out.append((_cpu_loops.run("bernoulli_logits", s, t, d, 0.5), d))
    finally:
        torch.set_num_threads(before)
    ref, ref_d = _bce_oracle(s, t)
    torch.testing.assert_close(out[1][0], ref.sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[1][1].double(), 0.5 * ref_d, rtol=1e-6, atol=1e-7)
    d = torch.empty(1500, 784)
    contiguous = (_cpu_loops.run("bernoulli_logits", s.contiguous(), t, d, 0.5), d)
    for a, b in ((out[0], out[1]), (out[0], contiguous)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_broadcast_rows():
    """Rows are addressed as start + i * row stride: a target broadcast over the batch (row stride
    0, e.g. one template image) gives the bits of its contiguous copy."""
    g = torch.Generator().manual_seed(7)
    s = torch.randn(300, 784, generator=g)
    t = torch.rand(1, 784, generator=g).expand(300, 784)
    assert t.stride(0) == 0 and _cpu_loops.takes(s, t)
    d1, d2 = torch.empty(300, 784), torch.empty(300, 784)
    r1 = _cpu_loops.run("bernoulli_logits", s, t, d1, 1.0)
    r2 = _cpu_loops.run("bernoulli_logits", s, t.contiguous(), d2, 1.0)
    assert torch.equal(r1, r2) and torch.equal(d1, d2)


def test_without_gradient_same_rows():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(40, 784, generator=g), torch.rand(40, 784, generator=g)
    for element in ("bernoulli_logits", "gaussian", "continuous_bernoulli"):
        assert torch.equal(_cpu_loops.run(element, s, t, None, 1.0),
                           _cpu_loops.run(element, s, t, torch.empty_like(s), 1.0))


@pytest.mark.parametrize("threads", [1, 2])
def test_row_constants_are_the_two_ops_they_replace(threads):
    """``row_mul``/``row_add`` give each row sum ``(sum * row_mul) + row_add`` with the two
    float64 roundings of ``rows.mul_(row_mul).add_(row_add)`` (what the fallback did after the
    loop), in the serial and the OpenMP-parallel loop; the defaults change no bit, -0.0 rows
    included (-0.0 is the exact identity of addition)."""
    g = torch.Generator().manual_seed(8)
    s, t = 2.0 * torch.randn(200, 784, generator=g), torch.rand(200, 784, generator=g)
    s[3] = 0.0  # a row of zeros: its Gaussian sum is 0
    assert s.numel() >= _cpu_loops._PARALLEL_MIN
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for element in ("bernoulli_logits", "gaussian", "continuous_bernoulli", "gaussian_kl"):
            for rows_ in (s, s[:20]):  # parallel (two threads) and serial sizes
                tt = t[: rows_.shape[0]]
                plain = _cpu_loops.run(element, rows_, tt, None, 1.0)
                for mul, add in ((1.0, -0.0), (0.5, -0.0), (0.37, 1234.567), (1.0, -543.21), (-3.0, 0.0)):
                    got = _cpu_loops.run(element, rows_, tt, None, 1.0, mul, add)
                    want = plain.clone().mul_(mul).add_(add)
                    assert torch.equal(got, want), (element, mul, add)
                    assert torch.equal(torch.signbit(got), torch.signbit(want)), (element, mul, add)
                assert torch.equal(_cpu_loops.run(element, rows_, tt, None, 1.0, 1.0, -0.0), plain)
        neg_zero = _cpu_loops.run("gaussian", s[3:4], s[3:4], None, 1.0, -1.0)  # -(0.0) stays -0.0
        assert neg_zero.item() == 0.0 and torch.signbit(neg_zero).item()
    finally:
        torch.set_num_threads(before)


def test_empty_and_single_column():
    for R, D in ((0, 784), (5, 1), (3, 0)):
        s, t = torch.randn(R, D), torch.rand(R, D)
        d = torch.empty(R, D)
        rows = _cpu_loops.run("bernoulli_logits", s, t, d, 1.0)
        ref, ref_d = _bce_oracle(s, t)
        torch.testing.assert_close(rows, ref.sum(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(d.double(), ref_d, rtol=1e-6, atol=1e-7)


def test_takes_only_what_it_can_read():
    """The loops run on float32 decoder outputs with float32 or uint8 targets of the same shape
    and unit column stride; anything else goes to the ATen formulation."""
    s, t = torch.randn(4, 6), torch.rand(4, 6)
    assert _cpu_loops.takes(s, t) and _cpu_loops.takes(s, (t * 255).to(torch.uint8))
    assert not _cpu_loops.takes(s.double(), t.double())
    assert not _cpu_loops.takes(s.bfloat16(), t)
    assert not _cpu_loops.takes(s, t.double())
    assert not _cpu_loops.takes(s.t(), t.t())                       # column stride 4
    assert not _cpu_loops.takes(s, t[:3])
    assert not _cpu_loops.takes(s.reshape(2, 2, 6), t.reshape(2, 2, 6))
    assert _cpu_loops.takes(torch.nn.Parameter(s), t)                # learned codes, for example
    assert not _cpu_loops.takes(s.to("meta"), t.to("meta"))
    seen = []                                                         # torch.func's wrappers
    torch.func.vmap(lambda a: seen.append(_cpu_loops.takes(a, a)) or a)(torch.randn(3, 4, 6))
    assert seen == [False]
    with pytest.raises(ValueError, match="gradient buffer"):
        _cpu_loops.run("bernoulli_logits", s, t, torch.empty(4, 6, dtype=torch.float64), 1.0)


def test_off_switch(monkeypatch):
    monkeypatch.setattr(_cpu_loops, "ENABLED", False)
    assert not _cpu_loops.takes(torch.randn(4, 6), torch.rand(4, 6))
    rows = torch.ones(3, dtype=torch.float64)
    assert _cpu_loops.totals(rows, rows, 1.0, 1.0) is None  # the caller's ATen ops serve


def test_elbo_runs_the_loops_once_over_the_batch(monkeypatch):
    """The op calls the loops once for a whole batch of several ATen chunks (the Bernoulli on
    logits, the Gaussian with a number sigma or the continuous Bernoulli, uint8 x; then the KL),
    then takes the batch's totals in one call, and gives the oracle's loss and gradients."""
    calls = []
    real, real_totals = _cpu_loops._launch, _cpu_loops._totals
    monkeypatch.setattr(_cpu_loops, "_launch", lambda e, s, *a: calls.append((e, s.shape[0])) or real(e, s, *a))
    monkeypatch.setattr(_cpu_loops, "_totals",
                        lambda r, k, R, *a: calls.append(("totals", R)) or real_totals(r, k, R, *a))
    B = 3 * _fallback._chunk_rows(784) + 7
    g = torch.Generator().manual_seed(4)
    recon = 2.0 * torch.randn(B, 784, generator=g)
    x = torch.randint(0, 256, (B, 784), generator=g, dtype=torch.uint8)
    mu, logvar = torch.randn(B, 20, generator=g), 0.5 * torch.randn(B, 20, generator=g)
    for kw in (dict(), dict(likelihood="gaussian", sigma=0.5), dict(likelihood="continuous_bernoulli")):
        calls.clear()
        leaves = [t.clone().requires_grad_() for t in (recon, mu, logvar)]
        loss = fastvae.elbo_loss(leaves[0], x, leaves[1], leaves[2], reduction="batchmean",
                                 backend="torch", **kw)
        go = torch.tensor(0.7)
        grads = torch.autograd.grad(loss, leaves, go)
        name = kw.get("likelihood", "bernoulli_logits")
        assert calls == [(name, B), ("gaussian_kl", B), ("totals", B)]
        ref, ref_grads = oracle.elbo(recon, x, mu, logvar, reduction="batchmean", grad_output=go, **kw)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
        for name, got in zip(("recon", "mu", "logvar"), grads):
            torch.testing.assert_close(got.double(), ref_grads[name], rtol=1e-5, atol=1e-9)


def test_each_pair_is_checked_once(monkeypatch):
    """A call checks that the loops can read (mu, logvar) and (recon, x) once each: the
    likelihood's loop trusts the op's check (each check costs microseconds at small batches)."""
    seen = []
    real = _cpu_loops.takes
    monkeypatch.setattr(_cpu_loops, "takes", lambda s, t: seen.append(tuple(s.shape)) or real(s, t))
    g = torch.Generator().manual_seed(5)
    recon, x = torch.randn(64, 784, generator=g), torch.rand(64, 784, generator=g)
    mu, logvar = torch.randn(64, 20, generator=g), torch.randn(64, 20, generator=g)
    for kw in (dict(), dict(likelihood="gaussian", sigma=0.5), dict(likelihood="continuous_bernoulli")):
        seen.clear()
        leaves = [t.clone().requires_grad_() for t in (recon, mu, logvar)]
        loss = fastvae.elbo_loss(leaves[0], x, leaves[1], leaves[2], backend="torch", **kw)
        torch.autograd.grad(loss, leaves)
        assert seen == [(64, 20), (64, 784)], kw


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "continuous_bernoulli"])
def test_special_values_as_the_aten_formulation(likelihood, monkeypatch):
    """Rows holding one NaN, +-inf or huge value among ordinary ones: per-row losses and
    gradients NaN, infinite or finite where the ATen formulation's are, and close where finite."""
    specials = [math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-30, 0.0, -0.0]
    g = torch.Generator().manual_seed(5)
    recon = torch.randn(2 * len(specials), 50, generator=g)
    x = torch.rand(2 * len(specials), 50, generator=g)
    for i, v in enumerate(specials):
        recon[i, 7] = v                      # a special decoder output
        x[len(specials) + i, 7] = v if math.isfinite(v) or math.isnan(v) else 0.5  # a special target
    mu = torch.zeros(recon.shape[0], 3)
    kw = dict(likelihood=likelihood, sigma=0.5) if likelihood == "gaussian" else dict(likelihood=likelihood)

    def run():
        r = recon.clone().requires_grad_()
        loss = fastvae.elbo_loss(r, x, mu, mu, reduction="none", backend="torch", **kw)
        d, = torch.autograd.grad(loss.sum(), r)
        return loss.detach(), d

    loop = run()
    monkeypatch.setattr(_cpu_loops, "ENABLED", False)
    aten = run()
    for a, b in zip(loop, aten):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        assert torch.equal(a[a.isinf()], b[b.isinf()])
        finite = a.isfinite()
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("R", [1, 15, 16, 17, 1100])
def test_totals_are_the_float64_sums_rounded_once(R):
    """(loss, reconstruction, kl, kl) from the float64 rows: each within one float32 rounding of
    the exact sums (math.fsum) divided by div, the loss A + beta K; four distinct 0-dim float32
    tensors."""
    g = torch.Generator().manual_seed(R)
    rec = 50.0 + 600.0 * torch.rand(R, dtype=torch.float64, generator=g)
    kl = 30.0 * torch.rand(R, dtype=torch.float64, generator=g) - 1.0  # a negative row too
    for div, beta in ((1.0, 1.0), (float(R), 1.0), (1.0, 0.3), (float(R), 4.0), (3.0, 0.0)):
        out = _cpu_loops.totals(rec, kl, div, beta)
        A, K = math.fsum(rec.tolist()) / div, math.fsum(kl.tolist()) / div
        for got, want in zip(out, (A + beta * K, A, K, K)):
            assert got.dtype == torch.float32 and got.dim() == 0
            assert abs(got.item() - want) <= F32_EPS * abs(want) * (1 + 1e-9), (div, beta, got, want)
        assert len({t.data_ptr() for t in out}) == 4
        again = _cpu_loops.totals(rec, kl, div, beta)
        assert all(torch.equal(a, b) for a, b in zip(out, again))


def test_totals_special_values():
    """beta = 0 keeps an infinite KL out of the loss (as ``rec.clone()`` did); NaN and inf
    propagate to the terms they are in."""
    rec = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    kl = torch.tensor([0.5, math.inf, 1.0], dtype=torch.float64)
    loss, a, k, k2 = _cpu_loops.totals(rec, kl, 1.0, 0.0)
    assert loss.item() == 6.0 and a.item() == 6.0 and k.item() == math.inf and k2.item() == math.inf
    assert _cpu_loops.totals(rec, kl, 1.0, 1.0)[0].item() == math.inf
    rec[1] = math.nan
    loss, a, k, _ = _cpu_loops.totals(rec, kl, 1.0, 0.0)
    assert math.isnan(loss.item()) and math.isnan(a.item()) and k.item() == math.inf


@pytest.mark.parametrize("kw", [dict(reduction="none"), dict(free_bits=0.1), dict(reduction="sum")])
def test_totals_only_for_the_loops_rows_reduced(monkeypatch, kw):
    """The op takes the totals in one call for a reduced loss whose KL came from the fused loop;
    per-row outputs and the free-bits KL (ATen's) keep the ATen ops. The values are the oracle's
    either way."""
    calls = []
    real = _cpu_loops._totals
    monkeypatch.setattr(_cpu_loops, "_totals", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(6)
    recon, x = torch.randn(40, 784, generator=g), torch.rand(40, 784, generator=g)
    mu, logvar = torch.randn(40, 20, generator=g), torch.randn(40, 20, generator=g)
    out = fastvae.elbo_loss(recon, x, mu, logvar, backend="torch", return_components=True, **kw)
    assert calls == ([1] if kw == dict(reduction="sum") else [])
    ref, _ = oracle.elbo(recon, x, mu, logvar, **kw)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(7, 1), (5, 33), (40, 784), (3, 2000)])
@pytest.mark.parametrize("target", ["f32", "u8"])
def test_prefetching_changes_no_bit(shape, target, monkeypatch):
    """The Gaussian's loop asks for later rows ahead of reading them (_PREFETCH_AHEAD): its rows
    and d are the same bits as the same loop built without the prefetches, for narrow rows
    (many rows ahead), wide ones (the next row), batches shorter than the distance, strided rows
    and uint8 targets."""
    assert "gaussian" in _cpu_loops._PREFETCHED
    built = {}
    for prefetch in (True, False):
        monkeypatch.setattr(_cpu_loops, "_PREFETCHED", {"gaussian"} if prefetch else set())
        fns = _cpu_loops._build("gaussian", target)
        source = _cpu_loops._kernel("k", _cpu_loops._ELEMENTS["gaussian"], target, True, None, prefetch)
        assert ("@llvm.prefetch.p0(" in source) == prefetch
        built[prefetch] = fns[True][0]
    g = torch.Generator().manual_seed(sum(shape))
    R, D = shape
    s = torch.randn(R, D + 3, generator=g)[:, :D]  # rows strided by D + 3
    if target == "u8":
        t = torch.randint(0, 256, (R, D), generator=g, dtype=torch.uint8)
    else:
        t = torch.rand(R, D, generator=g)
    out = {}
    for prefetch, fn in built.items():
        d = torch.full((R, D), math.nan)
        rows = torch.full((R,), math.nan, dtype=torch.float64)
        fn(s.data_ptr(), t.data_ptr(), d.data_ptr(), rows.data_ptr(), R, D, s.stride(0), t.stride(0),
           d.stride(0), 4.0, 2.0, -0.0)
        out[prefetch] = (rows, d)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    want = (s.double() - (t.double() / 255.0 if target == "u8" else t.double())).square().sum(1) * 2.0
    torch.testing.assert_close(out[True][0], want, rtol=1e-6, atol=0)


def _element_oracle(element, s, t):
    """(per-element value the loop sums, d/ds) in float64, from the formulas."""
    s, t = s.double(), t.double()
    if element == "gaussian":
        return (s - t) ** 2, s - t
    nll, grad = _bce_oracle(s, t)
    if element == "continuous_bernoulli":
        sd = s.clone().requires_grad_()
        log_c = oracle.cb_log_norm_closed(sd)
        (dlog_c,) = torch.autograd.grad(log_c.sum(), sd)
        return nll - (log_c.detach() - math.log(2.0)), grad - dlog_c
    return nll, grad


@pytest.mark.parametrize("element", ["bernoulli_logits", "gaussian", "continuous_bernoulli"])
@pytest.mark.parametrize("strided", [False, True], ids=["flat", "row-stride"])
def test_loop_bounds_give_the_oracles_values_and_touch_nothing_beyond(element, strided):
    """Rows of 1, W - 1, W, W + 1, 2W - 1, 2W, 2W + 1 elements (W = the loop's vector width), 1 to 3
    rows: every value against the float64 oracle, with NaN just past each row and past the end (a
    read past a bound would make a sum NaN) and a sentinel around d (a write past it would show)."""
    W = _cpu_loops._WIDTH
    g = torch.Generator().manual_seed(7)
    for D in (1, W - 1, W, W + 1, 2 * W - 1, 2 * W, 2 * W + 1):
        for R in (1, 2, 3):
            stride = D + 5 if strided else D
            s_buf = torch.full((R * stride + 2 * W,), math.nan)
            t_buf = torch.full((R * stride + 2 * W,), math.nan)
            d_buf = torch.full((R * stride + 2 * W,), 12345.0)
            S = s_buf[: R * stride].view(R, stride)[:, :D]
            T = t_buf[: R * stride].view(R, stride)[:, :D]
            d = d_buf[: R * stride].view(R, stride)[:, :D]
            S.copy_(torch.randn(R, D, generator=g) * 3 + 0.1)
            T.copy_(torch.rand(R, D, generator=g))
            rows = _cpu_loops.run(element, S, T, d, 1.0)
            value, grad = _element_oracle(element, S, T)
            where = f"{element} R={R} D={D} stride={stride}"
            torch.testing.assert_close(rows, value.sum(1), rtol=1e-6, atol=1e-6, msg=where)
            torch.testing.assert_close(d.double(), grad, rtol=1e-5, atol=1e-6, msg=where)
            untouched = torch.ones_like(d_buf, dtype=torch.bool)
            untouched[: R * stride].view(R, stride)[:, :D] = False
            assert (d_buf[untouched] == 12345.0).all(), f"a write past the bounds: {where}"
