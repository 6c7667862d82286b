"""fastvae.reparameterize: values and gradients against the float64 oracle, and the noise drawn
inside the kernel: reproducible, fresh, N(0, 1), uncorrelated."""
import numpy as np
import pytest
import torch
from scipy import stats

import fastvae
import oracle


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("shape", [(1, 1), (7, 20), (3, 5, 9), (4, 300)])
def test_given_eps_matches_oracle(backend_device, shape):
    backend, device = backend_device
    g = torch.Generator().manual_seed(0)
    mu, logvar, eps, go = (torch.randn(shape, generator=g).to(device) for _ in range(4))
    m, v, e = leaves(mu, logvar, eps)
    z = fastvae.reparameterize(m, v, eps=e, backend=backend)
    z.backward(go)
    ref_z, ref = oracle.reparameterize(mu, logvar, eps, go)
    assert z.shape == shape and z.dtype == torch.float32
    torch.testing.assert_close(z.double().cpu(), ref_z, rtol=1e-6, atol=1e-6)
    for name, t in (("mu", m), ("logvar", v), ("eps", e)):
        torch.testing.assert_close(t.grad.double().cpu(), ref[name], rtol=1e-6, atol=1e-6)


def test_extreme_logvar_and_non_contiguous(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 16, generator=g)
    h[:, 8:] = torch.empty(6, 8).uniform_(-30, 30, generator=g)
    h = h.to(device)
    mu, logvar = h.chunk(2, dim=1)                # strided views of one encoder output
    eps = torch.randn(8, 6, generator=g).t().to(device)   # transposed
    go = torch.randn(6, 8, generator=g).to(device)
    m, v = leaves(mu, logvar)
    z = fastvae.reparameterize(m, v, eps=eps, backend=backend)
    z.backward(go)
    ref_z, ref = oracle.reparameterize(mu, logvar, eps, go)
    torch.testing.assert_close(z.double().cpu(), ref_z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.grad.double().cpu(), ref["mu"])
    torch.testing.assert_close(v.grad.double().cpu(), ref["logvar"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend_device, dtype):
    backend, device = backend_device
    g = torch.Generator().manual_seed(2)
    mu, logvar, eps, go = (torch.randn(5, 20, generator=g).to(device, dtype) for _ in range(4))
    m, v = leaves(mu, logvar)
    z = fastvae.reparameterize(m, v, eps=eps, backend=backend)
    z.backward(go)
    ref_z, ref = oracle.reparameterize(mu, logvar, eps, go)
    # one rounding of an fp32 result: at most u relative (+ the fp32 arithmetic, ~1e-6 of the terms)
    u = torch.finfo(dtype).eps / 2
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        u = torch.finfo(dtype).eps  # Triton's interpreter rounds to bf16 by truncation: 1 ulp
    assert z.dtype == dtype and v.grad.dtype == dtype and m.grad.dtype == dtype
    torch.testing.assert_close(z.double().cpu(), ref_z, rtol=u, atol=1e-5)
    torch.testing.assert_close(v.grad.double().cpu(), ref["logvar"], rtol=u, atol=1e-5)
    torch.testing.assert_close(m.grad.double().cpu(), ref["mu"], rtol=0, atol=0)  # d mu = g exactly


def test_drawn_noise_reproducible_and_fresh(backend_device):
    backend, device = backend_device
    mu = torch.zeros(32, 20, device=device)
    logvar = torch.zeros(32, 20, device=device)
    torch.manual_seed(123)
    a1 = fastvae.reparameterize(mu, logvar, backend=backend)
    a2 = fastvae.reparameterize(mu, logvar, backend=backend)
    torch.manual_seed(123)
    b1 = fastvae.reparameterize(mu, logvar, backend=backend)
    b2 = fastvae.reparameterize(mu, logvar, backend=backend)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    assert (a1 != a2).float().mean() > 0.99
    gen = torch.Generator(device=device).manual_seed(7)
    c1 = fastvae.reparameterize(mu, logvar, generator=gen, backend=backend)
    gen.manual_seed(7)
    c2 = fastvae.reparameterize(mu, logvar, generator=gen, backend=backend)
    assert torch.equal(c1, c2) and not torch.equal(c1, a1)


def test_drawn_noise_is_standard_normal_and_uncorrelated(backend_device):
    backend, device = backend_device
    torch.manual_seed(2024)
    M, L = 400, 128
    e = fastvae.reparameterize(torch.zeros(M, L, device=device), torch.zeros(M, L, device=device),
                               backend=backend).double().cpu()
    n = e.numel()
    flat = e.flatten().numpy()
    assert abs(flat.mean()) < 4 / np.sqrt(n)
    assert abs(flat.std() - 1) < 4 * np.sqrt(0.5 / n)
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    # neighbours along a row, down a column, and across the row boundary are uncorrelated
    for a, b in ((e[:, :-1], e[:, 1:]), (e[:-1, :], e[1:, :]), (e[:-1, -1], e[1:, 0])):
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(r) < 4 / np.sqrt(a.numel()), r
    # the noise is scaled and shifted: mean 3, std 2
    z = fastvae.reparameterize(torch.full((M, L), 3.0, device=device),
                               torch.full((M, L), float(np.log(4.0)), device=device), backend=backend)
    z = z.double().cpu()
    assert abs(z.mean().item() - 3) < 4 * 2 / np.sqrt(n)
    assert abs(z.std().item() - 2) < 4 * 2 * np.sqrt(0.5 / n)


def test_drawn_noise_backward_uses_the_same_noise(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(17, 20, generator=g).to(device)
    logvar = torch.randn(17, 20, generator=g).to(device)
    go = torch.randn(17, 20, generator=g).to(device)
    m, v = leaves(mu, logvar)
    z = fastvae.reparameterize(m, v, backend=backend)
    z.backward(go)
    eps = (z.detach() - mu) / torch.exp(0.5 * logvar)
    torch.testing.assert_close(m.grad, go)
    torch.testing.assert_close(v.grad, 0.5 * go * eps * torch.exp(0.5 * logvar), rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        fastvae.reparameterize(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="eps"):
        fastvae.reparameterize(torch.zeros(3, 4), torch.zeros(3, 4), eps=torch.zeros(4, 3))
    with pytest.raises(TypeError, match="mu"):
        fastvae.reparameterize(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="backend"):
        fastvae.reparameterize(torch.zeros(3, 4), torch.zeros(3, 4), backend="numpy")
