"""The PyTorch fallback's own guarantees: exact at confident logits, single pass (the gradient
buffers computed in the forward are handed over, not copied), correct on a second backward,
nothing computed under no_grad, bitwise reproducible."""
import pytest
import torch

import fastvae
import oracle
from fastvae import _fallback

D = 784


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


def test_confident_logits_rows_in_chunks(monkeypatch):
    """The same rows, walked in several row chunks."""
    monkeypatch.setattr(_fallback, "_CHUNK_ELEMENTS", 5 * D)
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
