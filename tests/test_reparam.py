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


def test_mixed_dtypes_promote(backend_device):
    """mu in bf16 and logvar in fp32 (e.g. a half-precision mean head): z comes in the promoted
    dtype, fp32, computed from the given values like the oracle; each gradient in its input's
    dtype."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(6, 20, generator=g).to(device, torch.bfloat16)
    logvar, eps, go = (torch.randn(6, 20, generator=g).to(device) for _ in range(3))
    m, v = leaves(mu, logvar)
    z = fastvae.reparameterize(m, v, eps=eps, backend=backend)
    z.backward(go)
    ref_z, ref = oracle.reparameterize(mu, logvar, eps, go)
    assert z.dtype == torch.float32 and m.grad.dtype == torch.bfloat16 and v.grad.dtype == torch.float32
    torch.testing.assert_close(z.double().cpu(), ref_z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v.grad.double().cpu(), ref["logvar"], rtol=1e-6, atol=1e-6)


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


# ---- num_samples = K: z [K, *mu.shape] ---------------------------------------------------------

@pytest.mark.parametrize("K,shape", [(1, (7, 20)), (3, (7, 20)), (4, (3, 5, 9)), (2, (1, 1))])
def test_num_samples_given_eps_matches_oracle(backend_device, K, shape):
    backend, device = backend_device
    g = torch.Generator().manual_seed(10 + K)
    mu, logvar = (torch.randn(shape, generator=g).to(device) for _ in range(2))
    eps, go = (torch.randn((K, *shape), generator=g).to(device) for _ in range(2))
    m, v, e = leaves(mu, logvar, eps)
    z = fastvae.reparameterize(m, v, num_samples=K, eps=e, backend=backend)
    assert z.shape == (K, *shape)
    z.backward(go)
    ref_z, ref = oracle.reparameterize(mu, logvar, eps, go)   # broadcasts over K, sums the grads
    torch.testing.assert_close(z.double().cpu(), ref_z, rtol=1e-6, atol=1e-6)
    for name, t in (("mu", m), ("logvar", v), ("eps", e)):
        assert t.grad.shape == t.shape
        torch.testing.assert_close(t.grad.double().cpu(), ref[name], rtol=1e-6, atol=1e-6)


def test_num_samples_non_contiguous(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(11)
    K = 3
    h = torch.randn(6, 16, generator=g).to(device)
    mu, logvar = h.chunk(2, dim=1)                                    # strided views
    eps = torch.randn(8, 6, K, generator=g).permute(2, 1, 0).to(device)  # [K, 6, 8], not contiguous
    go = torch.randn(6, K, 8, generator=g).transpose(0, 1).to(device)
    m, v, e = leaves(mu, logvar, eps)
    z = fastvae.reparameterize(m, v, num_samples=K, eps=e, backend=backend)
    z.backward(go)
    ref_z, ref = oracle.reparameterize(mu, logvar, eps, go)
    torch.testing.assert_close(z.double().cpu(), ref_z, rtol=1e-6, atol=1e-6)
    for name, t in (("mu", m), ("logvar", v), ("eps", e)):
        torch.testing.assert_close(t.grad.double().cpu(), ref[name], rtol=1e-6, atol=1e-6)


def test_num_samples_one_is_todays_draw(backend_device):
    backend, device = backend_device
    mu = torch.randn(9, 20).to(device)
    logvar = torch.randn(9, 20).to(device)
    torch.manual_seed(5)
    a = fastvae.reparameterize(mu, logvar, backend=backend)
    torch.manual_seed(5)
    b = fastvae.reparameterize(mu, logvar, num_samples=1, backend=backend)
    assert a.shape == (9, 20) and b.shape == (1, 9, 20)
    assert torch.equal(a, b[0])


def test_num_samples_drawn_noise_is_independent_standard_normal(backend_device):
    backend, device = backend_device
    torch.manual_seed(77)
    K, M, L = 50, 16, 20
    mu = torch.full((M, L), 3.0, device=device)
    logvar = torch.full((M, L), float(np.log(4.0)), device=device)
    z = fastvae.reparameterize(mu, logvar, num_samples=K, backend=backend).double().cpu()
    e = (z - 3.0) / 2.0                                               # [K, M, L]
    flat = e.flatten().numpy()
    n = flat.size
    assert abs(flat.mean()) < 4 / np.sqrt(n)
    assert abs(flat.std() - 1) < 4 * np.sqrt(0.5 / n)
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    # the samples of one input differ and are uncorrelated across k (no repeated stream)
    a, b = e[:-1].flatten().numpy(), e[1:].flatten().numpy()
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(a.size)
    assert (e[0] != e[1]).all()


def test_num_samples_backward_redraws_same_noise_and_is_deterministic(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(12)
    K = 6
    mu = torch.randn(17, 20, generator=g).to(device)
    logvar = torch.randn(17, 20, generator=g).to(device)
    go = torch.randn(K, 17, 20, generator=g).to(device)
    grads = []
    for _ in range(2):
        m, v = leaves(mu, logvar)
        z = fastvae.reparameterize(m, v, num_samples=K, generator=torch.Generator(device=device).manual_seed(9),
                                   backend=backend)
        z.backward(go)
        grads.append((z.detach(), m.grad, v.grad))
    z = grads[0][0]
    eps = (z.double() - mu.double()) / torch.exp(0.5 * logvar.double())
    _, ref = oracle.reparameterize(mu, logvar, eps, go)
    torch.testing.assert_close(grads[0][1].double().cpu(), ref["mu"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0][2].double().cpu(), ref["logvar"], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        assert torch.equal(a, b)                                      # bitwise reproducible


@pytest.mark.parametrize("bad,err", [(0, ValueError), (-2, ValueError), (True, TypeError),
                                     (2.0, TypeError), ("3", TypeError)])
def test_num_samples_bad_values(bad, err):
    with pytest.raises(err, match="num_samples"):
        fastvae.reparameterize(torch.zeros(3, 4), torch.zeros(3, 4), num_samples=bad)


def test_num_samples_eps_shape_checked():
    with pytest.raises(ValueError, match=r"num_samples.*\(2, 3, 4\)"):
        fastvae.reparameterize(torch.zeros(3, 4), torch.zeros(3, 4), num_samples=2,
                               eps=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="eps"):
        fastvae.reparameterize(torch.zeros(3, 4), torch.zeros(3, 4), eps=torch.zeros(2, 3, 4))


@pytest.mark.skipif(not fastvae.triton_available(), reason="needs triton")
def test_num_samples_op_registration():
    # as in test_compile: the fake-tensor check needs real (not interpreted) kernels
    cuda = torch.cuda.is_available()
    checks = ("test_schema", "test_autograd_registration") + (("test_faketensor",) if cuda else ())
    dev = "cuda" if cuda else "cpu"
    mu = torch.randn(5, 3, device=dev, requires_grad=True)
    logvar = torch.randn(5, 3, device=dev, requires_grad=True)
    eps, seed = torch.randn(10, 3, device=dev), torch.tensor([42], device=dev)
    for args in ((mu, logvar, eps, None, 2), (mu, logvar, None, seed, 2)):
        torch.library.opcheck(torch.ops.fastvae.reparameterize.default, args, test_utils=checks)


@pytest.mark.parametrize("num_samples", [None, 3])
@pytest.mark.parametrize("mu_shape,logvar_shape", [((7, 5), (5,)), ((7, 5), (7, 1)), ((1, 5), (7, 5)),
                                                   ((2, 7, 5), (5,))])
def test_mu_and_logvar_broadcast(backend_device, mu_shape, logvar_shape, num_samples):
    """mu and logvar broadcast as in torch.distributions.Normal (a learned logvar [L] shared by
    the batch, a per-sample [B, 1]): z of the broadcast shape, and each gradient summed back to
    its input's shape, against the float64 oracle (which broadcasts the same formula)."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(30)
    shape = torch.broadcast_shapes(mu_shape, logvar_shape)
    full = shape if num_samples is None else (num_samples, *shape)
    mu = torch.randn(mu_shape, generator=g).to(device)
    logvar = torch.randn(logvar_shape, generator=g).to(device)
    eps, go = (torch.randn(full, generator=g).to(device) for _ in range(2))
    m, v, e = leaves(mu, logvar, eps)
    z = fastvae.reparameterize(m, v, eps=e, num_samples=num_samples, backend=backend)
    assert z.shape == full
    z.backward(go)
    ref_z, ref = oracle.reparameterize(mu, logvar, eps, go)
    torch.testing.assert_close(z.double().cpu(), ref_z, rtol=1e-6, atol=1e-6)
    for name, t in (("mu", m), ("logvar", v), ("eps", e)):
        assert t.grad.shape == t.shape, name
        torch.testing.assert_close(t.grad.double().cpu(), ref[name], rtol=1e-5, atol=1e-5)
    # drawn noise: the broadcast shape too, and the same draw as with the inputs expanded
    torch.manual_seed(31)
    z1 = fastvae.reparameterize(mu, logvar, num_samples=num_samples, backend=backend)
    torch.manual_seed(31)
    z2 = fastvae.reparameterize(mu.expand(shape).contiguous(), logvar.expand(shape).contiguous(),
                                num_samples=num_samples, backend=backend)
    assert z1.shape == full
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)


def test_mu_and_logvar_that_do_not_broadcast_are_refused():
    with pytest.raises(ValueError, match=r"broadcast.*\(3, 4\).*\(2, 4\)"):
        fastvae.reparameterize(torch.zeros(3, 4), torch.zeros(2, 4))
