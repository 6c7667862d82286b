"""The PyTorch fallback's own guarantees: exact at confident logits, single pass (the gradient
buffers computed in the forward are handed over, not copied), correct on a second backward,
nothing computed under no_grad, bitwise reproducible."""
import math

import pytest
import torch

import fastvae
import oracle
from conftest import use_formulation
from fastvae import _fallback

D = 784


@pytest.fixture(autouse=True, params=["loops", "aten"])
def formulation(request, monkeypatch):
    """Every test here runs with the fallback's fused CPU loops and with its ATen formulation;
    those marked ``aten`` test the latter's internals only."""
    if request.param == "loops" and request.node.get_closest_marker("aten"):
        pytest.skip("tests the ATen formulation's internals")
    use_formulation(request.param, monkeypatch)
    return request.param


def _leaves(*tensors, x_grad=False):
    recon, x, mu, logvar = (t.detach().clone() for t in tensors)
    recon.requires_grad_()
    mu.requires_grad_()
    logvar.requires_grad_()
    if x_grad:
        x.requires_grad_()
    return recon, x, mu, logvar


def _latent(B, L=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, generator=g), 0.5 * torch.randn(B, L, generator=g)


def _confident_case():
    """Rows of 784 equal logits s = +-15 ... +-40 with targets 0 or 1: the matched rows (s > 0,
    x = 1 and s < 0, x = 0) have losses from 2.4e-4 down to 3e-15, the mismatched ones ~ 784 |s|."""
    rows_s, rows_x = [], []
    for m in (15.0, 20.0, 25.0, 30.0, 35.0, 40.0):
        for sign in (1.0, -1.0):
            for target in (0.0, 1.0):
                rows_s.append(torch.full((D,), sign * m))
                rows_x.append(torch.full((D,), target))
    # one row mixing all of them
    mixed = torch.stack(rows_s).reshape(-1)[torch.randperm(len(rows_s) * D,
                                                           generator=torch.Generator().manual_seed(3))]
    rows_s.append(mixed[:D])
    rows_x.append((mixed[:D] > 0).float())
    recon, x = torch.stack(rows_s), torch.stack(rows_x)
    mu = torch.zeros(recon.shape[0], 4)  # KL = 0: the rows are the BCE alone
    return recon, x, mu, torch.zeros_like(mu)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_confident_logits_match_oracle(reduction):
    recon, x, mu, logvar = _confident_case()
    loss = fastvae.elbo_loss(recon, x, mu, logvar, reduction=reduction, backend="torch")
    ref, _ = oracle.elbo(recon, x, mu, logvar, reduction=reduction)
    if reduction == "none":
        # the tiny matched rows must not cancel to 0 (s = 15, x = 1: 2.398e-4)
        assert ref.min() < 1e-14 and (loss > 0).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.aten
def test_confident_logits_rows_in_chunks(monkeypatch):
    """The same rows, walked in several row chunks."""
    monkeypatch.setattr(_fallback, "_CHUNK_ELEMENTS", 5 * D)
    monkeypatch.setattr(_fallback, "_threads", lambda: 1)  # chunks scale with the threads (up to 8)
    recon, x, mu, logvar = _confident_case()
    assert len(_fallback._row_chunks(recon.shape[0], D)) > 1
    loss = fastvae.elbo_loss(recon, x, mu, logvar, reduction="none", backend="torch")
    ref, _ = oracle.elbo(recon, x, mu, logvar, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


def test_wide_rows_split_the_float64_product():
    """sum(log(1 + e)) is the log of a float64 product: over 2500 columns near s = 0 it would
    overflow (2**2500) without the split into blocks of columns."""
    g = torch.Generator().manual_seed(4)
    recon = 1e-3 * torch.randn(3, 2500, generator=g)
    x = torch.rand(3, 2500, generator=g)
    mu, logvar = _latent(3, 5)
    loss = fastvae.elbo_loss(recon, x, mu, logvar, reduction="none", backend="torch")
    ref, _ = oracle.elbo(recon, x, mu, logvar, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


def _recording(monkeypatch):
    """Record the data pointers of the gradient buffers the op makes (holding the buffers
    themselves would make AccumulateGrad copy them)."""
    made = []
    real = _fallback._grad_buffer

    def grad_buffer(t, dt):
        buf = real(t, dt)
        made.append(buf.data_ptr())
        return buf

    monkeypatch.setattr(_fallback, "_grad_buffer", grad_buffer)
    return made


def _case(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu, logvar = _latent(B, seed=seed)
    return 3.0 * torch.randn(B, D, generator=g), torch.rand(B, D, generator=g), mu, logvar


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "none"])
def test_single_pass_hands_its_buffers_over(monkeypatch, reduction):
    """With grad_output = 1 the forward's gradient buffers become .grad as they are: no copy."""
    made = _recording(monkeypatch)
    recon, x, mu, logvar = _leaves(*_case(100), x_grad=True)
    loss = fastvae.elbo_loss(recon, x, mu, logvar, reduction=reduction, backend="torch")
    assert len(made) == 2  # d recon and d x, written during the forward
    loss.backward(torch.ones_like(loss))
    assert recon.grad.data_ptr() == made[0]
    assert x.grad.data_ptr() == made[1]
    _, ref = oracle.elbo(recon, x, mu, logvar, reduction=reduction)
    for name, t in (("recon", recon), ("x", x), ("mu", mu), ("logvar", logvar)):
        torch.testing.assert_close(t.grad.double(), ref[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "none"])
def test_retain_graph_second_backward(reduction):
    """The first backward hands the buffers over (scaled by grad_output in place); a second one of
    the same graph recomputes, so .grad accumulates both."""
    inputs = _case(90, seed=1)
    recon, x, mu, logvar = _leaves(*inputs, x_grad=True)
    loss = fastvae.elbo_loss(recon, x, mu, logvar, reduction=reduction, backend="torch")
    g1 = torch.full_like(loss, 2.5) if reduction != "none" else torch.linspace(-2, 2, 90)
    g2 = torch.ones_like(loss)
    loss.backward(g1, retain_graph=True)
    loss.backward(g2)
    _, ref = oracle.elbo(*inputs, reduction=reduction, grad_output=g1 + g2)
    for name, t in (("recon", recon), ("mu", mu), ("logvar", logvar)):
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(t.grad.double(), ref[name], rtol=1e-5, atol=1e-6 * scale)
    _, ref_x = oracle.elbo(*(inputs[0], inputs[1].requires_grad_(), *inputs[2:]),
                           reduction=reduction, grad_output=g1 + g2)
    torch.testing.assert_close(x.grad.double(), ref_x["x"], rtol=1e-5, atol=1e-6)


def test_per_row_grad_output_scales_rows():
    inputs = _case(50, seed=2)
    recon, x, mu, logvar = _leaves(*inputs)
    loss = fastvae.elbo_loss(recon, x, mu, logvar, reduction="none", backend="torch")
    go = torch.randn(50, generator=torch.Generator().manual_seed(5))
    d_recon, d_mu, d_logvar = torch.autograd.grad(loss, (recon, mu, logvar), go)
    _, ref = oracle.elbo(*inputs, reduction="none", grad_output=go)
    for got, name in ((d_recon, "recon"), (d_mu, "mu"), (d_logvar, "logvar")):
        torch.testing.assert_close(got.double(), ref[name], rtol=1e-5,
                                   atol=1e-6 * ref[name].abs().max().item())


def test_no_gradient_work_without_grad(monkeypatch):
    made = _recording(monkeypatch)
    recon, x, mu, logvar = _leaves(*_case(40, seed=3))
    with torch.no_grad():
        loss = fastvae.elbo_loss(recon, x, mu, logvar, backend="torch")
    loss_plain = fastvae.elbo_loss(*(t.detach() for t in (recon, x, mu, logvar)), backend="torch")
    assert made == []
    assert torch.equal(loss, loss_plain)
    ref, _ = oracle.elbo(recon, x, mu, logvar)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)


def test_create_graph_gives_second_derivatives():
    """Under create_graph the backward recomputes with differentiable ops."""
    inputs = [t.double() for t in _case(4, seed=6)]
    recon, x, mu, logvar = _leaves(*inputs)
    loss = fastvae.elbo_loss(recon, x, mu, logvar, backend="torch")
    d_recon, d_logvar = torch.autograd.grad(loss, (recon, logvar), create_graph=True)
    dd, dd_logvar = torch.autograd.grad(d_recon.sum() + d_logvar.sum(), (recon, logvar))
    s = inputs[0]
    torch.testing.assert_close(dd, torch.sigmoid(s) * torch.sigmoid(-s), rtol=1e-10, atol=0)
    torch.testing.assert_close(dd_logvar, 0.5 * inputs[3].exp(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("from_logits", [True, False])
def test_loss_bitwise_reproducible(from_logits):
    """Same inputs, same loss to the bit, also when the batch is walked in several chunks."""
    B = 3 * _fallback._chunk_rows(D) + 7
    assert len(_fallback._row_chunks(B, D)) == 4
    recon, x, mu, logvar = _case(B, seed=7)
    if not from_logits:
        recon = torch.sigmoid(recon)
    losses = []
    for _ in range(2):
        leaves = _leaves(recon, x, mu, logvar)
        loss = fastvae.elbo_loss(*leaves, reduction="none", from_logits=from_logits, backend="torch")
        losses.append((loss, torch.autograd.grad(loss.sum(), leaves[0])[0]))
    assert torch.equal(losses[0][0], losses[1][0])
    assert torch.equal(losses[0][1], losses[1][1])
    ref, _ = oracle.elbo(recon, x, mu, logvar, reduction="none", from_logits=from_logits)
    torch.testing.assert_close(losses[0][0].double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.1])
def test_confident_random_logits_match_oracle(eps):
    """|s| drawn in [15, 40] with either sign, targets at (or eps away from) the side s points to:
    the relu(s) - s*t part is large per element and cancels, so it must be formed per element."""
    g = torch.Generator().manual_seed(8)
    s = (15 + 25 * torch.rand(64, D, generator=g)) * torch.where(torch.rand(64, D, generator=g) < 0.5, -1.0, 1.0)
    x = torch.where(s > 0, 1.0 - eps, eps)
    mu = torch.zeros(64, 4)
    loss = fastvae.elbo_loss(s, x, mu, mu, reduction="none", backend="torch")
    ref, _ = oracle.elbo(s, x, mu, mu, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


# ---- issue 9: the other likelihoods, components, sigma, free bits --------------------------------

# (likelihood, from_logits, sigma): sigma "tensor" is a per-sample [B, 1] tensor that requires grad
LIKELIHOODS = [("bernoulli", True, None), ("bernoulli", False, None), ("gaussian", True, 0.4),
               ("gaussian", True, "tensor"), ("mse", True, None), ("continuous_bernoulli", True, None)]
LIKELIHOOD_IDS = ["bernoulli-logits", "bernoulli-probs", "gaussian", "gaussian-sigma-tensor", "mse", "cb"]


def _internal(likelihood):
    """The fallback's name of a likelihood (mse is its Gaussian)."""
    return "gaussian" if likelihood == "mse" else likelihood


@pytest.mark.aten
def test_gaussian_chunks_are_larger():
    """The Gaussian (and mse) walks 4x larger row chunks than the other likelihoods."""
    rows = _fallback._chunk_rows(D)
    assert rows == _fallback._chunk_rows(D, "bernoulli") == _fallback._chunk_rows(D, "continuous_bernoulli")
    assert 4 * rows <= _fallback._chunk_rows(D, "gaussian") < 4 * (rows + 1)
    B = 3 * _fallback._chunk_rows(D)
    assert len(_fallback._row_chunks(B, D, "bernoulli")) == 3 and _fallback._row_chunks(B, D, "gaussian") == [None]


@pytest.mark.aten
def test_gaussian_forward_walks_its_larger_chunks(monkeypatch):
    """The forward really takes the likelihood's chunks: a batch that is 3 chunks for the
    Bernoulli is one for the Gaussian and mse."""
    seen = []
    real = _fallback._row_chunks
    monkeypatch.setattr(_fallback, "_row_chunks", lambda *a: seen.append(real(*a)) or seen[-1])
    B = 2 * _fallback._chunk_rows(D) + 5
    for likelihood in ("bernoulli", "gaussian", "mse"):
        inputs, kw = _lik_case(likelihood, True, None, B=B, seed=3)
        fastvae.elbo_loss(*_leaves(*inputs), backend="torch", **kw).backward()
    assert [len(c) for c in seen] == [3, 1, 1]


def _lik_case(likelihood, from_logits, sigma, B, seed=0, N=D):
    g = torch.Generator().manual_seed(seed)
    mu, logvar = _latent(B, seed=seed)
    s = 2.0 * torch.randn(B, N, generator=g)
    if likelihood in ("gaussian", "mse"):
        s = torch.rand(B, N, generator=g)
    elif not from_logits:
        s = torch.sigmoid(s)
    x = torch.rand(B, N, generator=g)
    sig = (0.3 + torch.rand(B, 1, generator=g)).requires_grad_() if sigma == "tensor" else sigma
    return (s, x, mu, logvar), dict(likelihood=likelihood, from_logits=from_logits, sigma=sig)


def _grads_of(result, leaves, weights=(1.0, 0.0, 0.0), go=None, **kw):
    obj = sum(w * ((c if go is None else c * go).sum()) for w, c in zip(weights, result))
    return torch.autograd.grad(obj, [t for t in leaves if t.requires_grad], **kw)


@pytest.mark.parametrize("case", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_every_likelihood_hands_its_buffers_over(monkeypatch, case):
    """Single pass for every likelihood: d recon, d x (and d sigma) written in the forward become
    .grad untouched when the loss's grad_output is 1; values against the oracle."""
    made = _recording(monkeypatch)
    inputs, kw = _lik_case(*case, B=40, seed=10)
    recon, x, mu, logvar = _leaves(*inputs, x_grad=True)
    sigma = kw["sigma"]
    loss = fastvae.elbo_loss(recon, x, mu, logvar, backend="torch", **kw)
    assert len(made) == (3 if case[2] == "tensor" else 2)
    loss.backward()
    assert recon.grad.data_ptr() == made[0] and x.grad.data_ptr() == made[1]
    leaves_ref, ref = oracle.terms(*inputs, **kw)
    want = oracle.grads(ref["loss"], leaves_ref)
    for name, t in (("recon", recon), ("x", x), ("mu", mu), ("logvar", logvar)) + (
            (("sigma", sigma),) if case[2] == "tensor" else ()):
        torch.testing.assert_close(t.grad.double(), want[name], rtol=1e-5,
                                   atol=1e-6 * want[name].abs().max().item())


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "none"])
@pytest.mark.parametrize("case", LIKELIHOODS, ids=LIKELIHOOD_IDS)
@pytest.mark.parametrize("free_bits", [0.0, 0.2])
def test_second_backward_recomputes_the_same_bits(case, reduction, free_bits):
    """A second backward of the graph (retain_graph) recomputes the gradients with the single
    pass's arithmetic: the same bits as the first, for components' grad_outputs too (the KL with
    and without free bits: without, its fused loop's h)."""
    inputs, kw = _lik_case(*case, B=30, seed=11)
    leaves = list(_leaves(*inputs, x_grad=True)) + ([kw["sigma"]] if case[2] == "tensor" else [])
    comp = fastvae.elbo_loss(*leaves[:4], reduction=reduction, beta=0.6, free_bits=free_bits,
                             return_components=True, backend="torch", **kw)
    go = None if reduction != "none" else torch.linspace(-2, 2, 30)
    first = _grads_of(comp, leaves, (1.0, 0.5, -0.3), go, retain_graph=True)
    second = _grads_of(comp, leaves, (1.0, 0.5, -0.3), go)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    leaves_ref, ref = oracle.terms(*inputs, reduction=reduction, beta=0.6, free_bits=free_bits, **kw)
    go64 = 1.0 if go is None else go.double()
    want = oracle.grads(sum(w * (ref[n] * go64).sum() for w, n in
                            zip((1.0, 0.5, -0.3), ("loss", "reconstruction", "kl"))), leaves_ref)
    for got, name in zip(first, ("recon", "x", "mu", "logvar", "sigma")):
        torch.testing.assert_close(got.double(), want[name], rtol=1e-5,
                                   atol=1e-6 * want[name].abs().max().item())


@pytest.mark.parametrize("case", LIKELIHOODS, ids=LIKELIHOOD_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_likelihood_in_row_chunks(monkeypatch, case, dtype):
    """Several row chunks (a ragged last one), sigma chunked with the rows, against the oracle."""
    monkeypatch.setattr(_fallback, "_CHUNK_ELEMENTS", 3 * 50)
    monkeypatch.setattr(_fallback, "_CHUNK_SCALE", {})
    monkeypatch.setattr(_fallback, "_threads", lambda: 1)
    inputs, kw = _lik_case(*case, B=11, seed=12, N=50)
    inputs = [t.to(dtype) for t in inputs]
    assert len(_fallback._row_chunks(11, 50, _internal(case[0]))) == 4
    for reduction in ("sum", "none"):
        leaves = list(_leaves(*inputs, x_grad=True)) + ([kw["sigma"]] if case[2] == "tensor" else [])
        loss = fastvae.elbo_loss(*leaves[:4], reduction=reduction, free_bits=0.3, backend="torch", **kw)
        go = torch.tensor(2.5) if reduction == "sum" else torch.randn(11)
        got = _grads_of((loss,), leaves, go=go)
        leaves_ref, ref = oracle.terms(*inputs, reduction=reduction, free_bits=0.3, **kw)
        torch.testing.assert_close(loss.double(), ref["loss"].detach(), rtol=1e-5, atol=1e-5)
        want = oracle.grads((ref["loss"] * go.double()).sum(), leaves_ref)
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        for g, name in zip(got, ("recon", "x", "mu", "logvar", "sigma")):
            torch.testing.assert_close(g.double(), want[name], rtol=tol,
                                       atol=tol * want[name].abs().max().item())


@pytest.mark.parametrize("case", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_every_likelihood_bitwise_reproducible_and_lazy(monkeypatch, case):
    """The same bits twice (several chunks); under no_grad no gradient buffer is made."""
    B = 2 * _fallback._chunk_rows(D, _internal(case[0])) + 5
    assert len(_fallback._row_chunks(B, D, _internal(case[0]))) == 3
    inputs, kw = _lik_case(*case, B=B, seed=13)
    runs = []
    for _ in range(2):
        leaves = _leaves(*inputs)
        loss = fastvae.elbo_loss(*leaves, reduction="none", backend="torch", **kw)
        runs.append((loss, *torch.autograd.grad(loss.sum(), leaves[0])))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    made = _recording(monkeypatch)
    with torch.no_grad():
        plain = fastvae.elbo_loss(*_leaves(*inputs), reduction="none", backend="torch", **kw)
    assert made == [] and torch.equal(plain, runs[0][0])


@pytest.mark.parametrize("sigma,reduction,B,size", [
    (0.5, "sum", 40, 1.0),            # ks = 4: the squares summed from the gradient
    (1.0, "sum", 40, 1.0),            # ks = 1: the gradient is s - t itself
    (0.5, "batchmean", 1100, 1.0),    # ks = 4 / 1100 (and > 1024 rows)
    (2e4, "batchmean", 40, 1.0),      # ks = 6e-11 < 2**-32: s - t formed first
    # ks = 1e10 > 2**32: s - t formed first; |s - t| ~ 1e10, whose squares fit in float32 while
    # those of ks (s - t) would not
    (1e-5, "sum", 40, 1e10),
], ids=["ks4", "ks1", "ks-batchmean", "ks-tiny", "ks-huge"])
def test_gaussian_float_sigma_both_forms_match_oracle(sigma, reduction, B, size):
    """The Gaussian with a float sigma forms d recon = ks (s - t), ks = scale / sigma^2, in one
    pass and sums the squares from it, unless ks is far from 1 (then from s - t): either way the
    loss, d recon and d x match the float64 oracle, and the loss has the same bits without
    gradients."""
    assert (_fallback._KS_FROM_GRAD[0] <= (1.0 / B if reduction == "batchmean" else 1.0) / sigma ** 2
            <= _fallback._KS_FROM_GRAD[1]) == (sigma < 1e3 and sigma > 1e-4)
    inputs, kw = _lik_case("gaussian", True, sigma, B=B, seed=21)
    inputs = (inputs[0] * size, *inputs[1:])
    recon, x, mu, logvar = _leaves(*inputs, x_grad=True)
    loss = fastvae.elbo_loss(recon, x, mu, logvar, reduction="none", backend="torch", **kw)
    go = 0.5 + torch.rand(B, generator=torch.Generator().manual_seed(22))
    scale = 1.0 / B if reduction == "batchmean" else 1.0
    got = torch.autograd.grad((loss * go * scale).sum(), (recon, x))
    ref, want = oracle.elbo(*inputs, reduction="none", grad_output=go * scale, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    for g, name in zip(got, ("recon", "x")):
        torch.testing.assert_close(g.double(), want[name], rtol=1e-5, atol=1e-6 * want[name].abs().max().item())
    red = fastvae.elbo_loss(recon, x, mu, logvar, reduction=reduction, backend="torch", **kw)
    red_got = torch.autograd.grad(red, (recon, x))
    for g, w in zip(red_got, got):
        torch.testing.assert_close(g.double(), w.double() / go[:, None].double(), rtol=1e-5,
                                   atol=1e-6 * w.abs().max().item())
    with torch.no_grad():
        plain = fastvae.elbo_loss(*inputs, reduction="none", backend="torch", **kw)
    assert torch.equal(plain, loss.detach())


def test_continuous_bernoulli_rows_near_one_half_do_not_cancel():
    """Near lam = 1/2 each pixel's NLL is bce - log C ~ (1/2 - t) s, both terms about log 2: the
    row sums are formed in float64, so a row's small loss keeps its digits."""
    g = torch.Generator().manual_seed(14)
    s = 1e-3 * torch.randn(6, 3000, generator=g)
    x = torch.rand(6, 3000, generator=g)
    mu = torch.zeros(6, 2)
    loss = fastvae.elbo_loss(s, x, mu, mu, reduction="none", likelihood="continuous_bernoulli",
                             backend="torch")
    ref, _ = oracle.elbo(s, x, mu, mu, reduction="none", likelihood="continuous_bernoulli")
    assert ref.abs().max() < 0.5  # vs 3000 log 2 = 2079 for each of the two terms
    # the fp32 inputs' pixel terms are exact to ~1e-7 absolute each: 3000 of them, 1e-5 in all
    torch.testing.assert_close(loss.double(), ref, rtol=0, atol=1e-5)


def test_fallback_every_likelihood_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the fallback for every likelihood, with components, a
    learned sigma and free bits, and gives the oracle's values and gradients."""
    torch._dynamo.reset()  # this test runs once per formulation: no recompile limit from the other
    for case in LIKELIHOODS:
        inputs, kw = _lik_case(*case, B=6, seed=15, N=30)
        leaves = list(_leaves(*inputs)) + ([kw["sigma"]] if case[2] == "tensor" else [])
        rest = {k: v for k, v in kw.items() if k != "sigma"}

        def step(r, x, m, v, *sig):
            c = fastvae.elbo_loss(r, x, m, v, free_bits=0.3, beta=0.5, reduction="batchmean",
                                  sigma=sig[0] if sig else kw["sigma"], return_components=True,
                                  backend="torch", **rest)
            return c.loss + 0.5 * c.reconstruction, c.kl

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss, kl = compiled(*leaves)
        got = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])
        leaves_ref, ref = oracle.terms(*inputs, free_bits=0.3, beta=0.5, reduction="batchmean", **kw)
        want_loss = ref["loss"] + 0.5 * ref["reconstruction"]
        torch.testing.assert_close(loss.double(), want_loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kl.double(), ref["kl"].detach(), rtol=1e-5, atol=1e-5)
        want = oracle.grads(want_loss, leaves_ref)
        names = [n for n in ("recon", "mu", "logvar", "sigma") if n in want]
        for g, name in zip(got, names):
            torch.testing.assert_close(g.double(), want[name], rtol=1e-5,
                                       atol=1e-6 * want[name].abs().max().item(), msg=lambda m: f"{case} {name}: {m}")


def test_autocast_every_likelihood():
    """Under bf16 autocast the loss still comes from the fp32 inputs as given."""
    for case in LIKELIHOODS:
        inputs, kw = _lik_case(*case, B=5, seed=16, N=40)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fastvae.elbo_loss(*inputs, backend="torch", **kw)
        assert loss.dtype == torch.float32
        ref, _ = oracle.elbo(*inputs, **kw)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("single_pass", [True, False], ids=["forward", "recompute"])
def test_cb_series_in_float64_against_the_closed_form(single_pass):
    """Below |s| = 0.75 log C and its derivative come from Taylor series in s^2: in float64 they
    are within their truncation (2.6e-10 and 4.9e-9 absolute at 0.75, the largest) of the closed
    forms log(s / tanh(s/2)) and 1/s - 1/sinh(s), themselves good to ~1e-12 there for |s| >= 0.05
    (their cancellation costs at most ~4 digits of float64's 16). Beyond 0.75, the closed forms."""
    s = torch.linspace(0.05, 0.75, 1401, dtype=torch.float64)
    s = torch.cat([s, -s, torch.tensor([0.7500000001, 0.8, 1.0, 2.0, -3.0], dtype=torch.float64)])
    ws = [torch.empty_like(s) for _ in range(_fallback._WORKSPACES["continuous_bernoulli"])] if single_pass else None
    log_c, d_log_c = _fallback._cb_log_norm(s, True, True, ws)
    want = oracle.cb_log_norm_closed(s) - math.log(2.0)  # the fallback forms log C - log 2
    want_d = 1.0 / s - 1.0 / torch.sinh(s)
    torch.testing.assert_close(log_c, want, rtol=0, atol=3e-10)
    torch.testing.assert_close(d_log_c, want_d, rtol=0, atol=5e-9)


@pytest.mark.aten
def test_constants_cache_is_bounded_and_exact():
    """Numbers that depend on the call (sigma, 1/B) go through the 0-dim constants cache too: over
    many distinct sigmas and batch sizes it stays within its bound, and every loss and gradient
    still matches the float64 oracle (a cleared cache makes new constants, never stale ones).
    (The ATen formulation's: the fused loops take the Gaussian's sigma-dependent numbers as
    arguments, so only the few 1/B values would reach the cache there.)"""
    g = torch.Generator().manual_seed(11)
    _fallback._CONSTANTS.clear()
    cleared, before = False, 0
    for i in range(3 * _fallback._MAX_CONSTANTS):
        B = 2 + i % 7
        sigma = 0.3 + 0.01 * i
        recon, x = torch.randn(B, 12, generator=g), torch.rand(B, 12, generator=g)
        mu, logvar = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
        leaves = _leaves(recon, x, mu, logvar)
        loss = fastvae.elbo_loss(*leaves, likelihood="gaussian", sigma=sigma, reduction="batchmean",
                                 backend="torch")
        grads = torch.autograd.grad(loss, [leaves[0], leaves[2], leaves[3]])
        cleared |= len(_fallback._CONSTANTS) < before
        before = len(_fallback._CONSTANTS)
        assert before <= _fallback._MAX_CONSTANTS
        ref, ref_grads = oracle.elbo(recon, x, mu, logvar, likelihood="gaussian", sigma=sigma,
                                     reduction="batchmean")
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
        for got, name in zip(grads, ("recon", "mu", "logvar")):
            torch.testing.assert_close(got.double(), ref_grads[name], rtol=1e-5, atol=1e-7)
    assert cleared  # the bound was reached and the cache cleared, at least once


# ---- huge pages for the op's own large buffers (fastvae/_memory.py) ----------------------------

_SMAPS = "/proc/self/smaps"
_HUGE = 1 << 21


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (from /proc/self/smaps)."""
    inside = False
    with open(_SMAPS) as f:
        for line in f:
            head = line.split()
            if not head[0].endswith(":"):  # a mapping's first line: "start-end perms ..."
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                inside = lo <= address < hi
            elif inside and head[0] == "VmFlags:":
                return head[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _interior(t: torch.Tensor) -> int:
    """The first 2 MB-aligned address inside t's memory."""
    return (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)


def _advised(monkeypatch, _memory) -> list[int]:
    """Record the data pointers of the tensors the op advises for huge pages (flags alone cannot
    tell: a freed advised region keeps its flag when the allocator reuses it)."""
    seen = []
    real = _memory.advise_huge_pages

    def advise(t):
        done = real(t)
        if done:
            seen.append(t.data_ptr())
        return done

    monkeypatch.setattr(_memory, "advise_huge_pages", advise)
    return seen


def _huge_pages_or_skip():
    import mmap
    import os
    from fastvae import _memory
    if not os.path.exists(_SMAPS) or getattr(mmap, "MADV_HUGEPAGE", None) is None:
        pytest.skip("no /proc/self/smaps or no MADV_HUGEPAGE: not Linux")
    if not _memory.ENABLED:
        pytest.skip("FASTVAE_HUGE_PAGES=0")
    return _memory


def test_advise_huge_pages_flags_a_fresh_buffer(monkeypatch, formulation):
    """A tensor on a new anonymous mapping of 40 MB gets the huge page flag ('hg') from the
    advice, on its 2 MB-aligned interior only; a buffer below MIN_BYTES or off the CPU costs no
    system call. (A new mapping: memory from the allocator may lie in a region advised before.)"""
    import mmap
    _memory = _huge_pages_or_skip()
    if formulation != "loops":
        pytest.skip("no formulation involved: run once")
    import ctypes
    mapping = mmap.mmap(-1, 44 << 20)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    offset = (-base) % _HUGE + 4160        # both ends 4160 and 12352 bytes past a 2 MB boundary
    t = torch.frombuffer(mapping, dtype=torch.float32, offset=offset, count=((40 << 20) + 8192) // 4)
    assert t.data_ptr() % _HUGE == 4160
    assert "hg" not in _vm_flags(_interior(t))
    assert _memory.advise_huge_pages(t)
    assert "hg" in _vm_flags(_interior(t))
    # the partial 2 MB page at each end (another allocation may share it): not advised
    assert "hg" not in _vm_flags(t.data_ptr() + t.numel() * 4 - 1)
    assert "hg" not in _vm_flags(t.data_ptr())
    calls = []
    monkeypatch.setattr(_memory, "_madvise", (lambda *a: calls.append(a) or 0, 14))
    small = torch.empty(_memory.MIN_BYTES // 4 - 1, dtype=torch.float32)
    assert not _memory.advise_huge_pages(small)
    assert not _memory.advise_huge_pages(torch.empty(10 << 20, device="meta"))
    assert calls == []
    monkeypatch.setattr(_memory, "ENABLED", False)
    assert not _memory.advise_huge_pages(torch.empty(10 << 20))
    assert calls == []


@pytest.mark.parametrize("case", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_large_gradient_buffers_ask_for_huge_pages(monkeypatch, case):
    """d recon and d x of 1400 x 784 (4.4 MB each, at least MIN_BYTES) are advised for huge pages
    before the forward writes them, and handed over with the oracle's values."""
    _memory = _huge_pages_or_skip()
    B = 1400
    assert B * D * 4 >= _memory.MIN_BYTES
    made, advised = _recording(monkeypatch), _advised(monkeypatch, _memory)
    inputs, kw = _lik_case(*case, B=B, seed=11)
    recon, x, mu, logvar = _leaves(*inputs, x_grad=True)
    fastvae.elbo_loss(recon, x, mu, logvar, backend="torch", **kw).backward()
    assert recon.grad.data_ptr() == made[0] and x.grad.data_ptr() == made[1]
    assert advised == made  # d sigma too where it is [B, N] (a per-element sigma)
    for t in (recon.grad, x.grad):
        assert "hg" in _vm_flags(_interior(t))
    leaves_ref, ref = oracle.terms(*inputs, **kw)
    want = oracle.grads(ref["loss"], leaves_ref)
    for name, t in (("recon", recon), ("x", x), ("mu", mu), ("logvar", logvar)):
        torch.testing.assert_close(t.grad.double(), want[name], rtol=1e-5,
                                   atol=1e-6 * want[name].abs().max().item())


def test_kl_loop_buffer_asks_for_huge_pages(monkeypatch, formulation):
    """The KL loop's h = exp(logvar) - 1 (d logvar, handed over) at B = 65536, L = 20 (5.2 MB) is
    advised too, with expm1's values."""
    _memory = _huge_pages_or_skip()
    if formulation != "loops":
        pytest.skip("the ATen formulation's h is torch.expm1's own tensor")
    advised = _advised(monkeypatch, _memory)
    mu, logvar = _latent(65536, seed=12)
    kl, _, _, h = _fallback._kl_terms(mu, logvar, 0.0)
    assert advised == [h.data_ptr()]
    assert "hg" in _vm_flags(_interior(h))
    torch.testing.assert_close(h.double(), torch.expm1(logvar.double()), rtol=2e-7, atol=1e-7)
    want = 0.5 * (torch.expm1(logvar.double()) - logvar.double() + mu.double() ** 2).sum(1)
    torch.testing.assert_close(kl.double(), want, rtol=1e-6, atol=1e-6)
