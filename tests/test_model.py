"""fastvae.VAE, decode_latents and evaluate (ELBO and the IWAE bound)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae.evaluate import iw_log_likelihood


@pytest.fixture
def model():
    torch.manual_seed(0)
    return fastvae.VAE(784, 64, 5)


def test_forward_shapes_and_uint8_inputs_match_floats(model):
    x = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(3)
    logits, mu, logvar = model(x, generator=gen)
    assert logits.shape == (7, 784) and mu.shape == (7, 5) and logvar.shape == (7, 5)
    gen.manual_seed(3)
    logits_f, mu_f, _ = model(x.float() / 255, generator=gen)
    torch.testing.assert_close(mu, mu_f)
    torch.testing.assert_close(logits, logits_f)


def test_forward_is_the_reparameterised_classic_model(model):
    x = torch.rand(4, 784)
    h = F.relu(model.fc1(x))
    mu, logvar = model.fc21(h), model.fc22(h)
    eps_gen = torch.Generator().manual_seed(5)
    eps = torch.randn(mu.shape, generator=eps_gen)
    expected = model.fc4(F.relu(model.fc3(mu + torch.exp(0.5 * logvar) * eps)))
    logits, _, _ = model(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits, expected)


def test_decode_sample_and_decode_latents(model):
    z = torch.randn(3, 5)
    p = model.decode(z)
    assert p.shape == (3, 784) and p.min() >= 0 and p.max() <= 1
    torch.testing.assert_close(p, torch.sigmoid(model.decode_logits(z)))
    torch.testing.assert_close(fastvae.decode_latents(model, z.tolist()), p)
    assert model.sample(6).shape == (6, 784)
    with pytest.raises(ValueError, match=r"z must be \[n, 5\]"):
        fastvae.decode_latents(model, [[0.5, 0.0]])


class PyTorchExampleVAE(torch.nn.Module):
    """The model of PyTorch's VAE example (pytorch/examples, vae/main.py), as written there."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 400)
        self.fc21 = torch.nn.Linear(400, 20)
        self.fc22 = torch.nn.Linear(400, 20)
        self.fc3 = torch.nn.Linear(20, 400)
        self.fc4 = torch.nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))


def test_loads_pytorch_example_state_dict_and_computes_the_same():
    torch.manual_seed(7)
    example = PyTorchExampleVAE()
    ours = fastvae.VAE()
    ours.load_state_dict(example.state_dict())  # strict: every name and shape must match
    x = torch.rand(5, 784)
    mu, logvar = ours.encode(x)
    mu_ref, logvar_ref = example.encode(x)
    torch.testing.assert_close(mu, mu_ref, rtol=0, atol=0)
    torch.testing.assert_close(logvar, logvar_ref, rtol=0, atol=0)
    z = torch.randn(5, 20)
    torch.testing.assert_close(ours.decode(z), example.decode(z), rtol=0, atol=0)
    # and the weights really came across (a fresh VAE computes something else)
    assert not torch.allclose(fastvae.VAE().encode(x)[0], mu_ref)


@pytest.mark.parametrize("kwargs", [{"latent_dim": 0}, {"hidden_dim": -3}, {"input_dim": 2.5},
                                    {"backend": "cuda"}])
def test_bad_sizes_raise(kwargs):
    with pytest.raises(ValueError):
        fastvae.VAE(**kwargs)


def test_wrong_input_size_raises(model):
    with pytest.raises(ValueError, match="784 elements per sample"):
        model(torch.rand(2, 100))


def _constant_decoder_model(mu_q: float, logvar_q: float) -> fastvae.VAE:
    """Decoder ignores z (p(x|z) = p(x)) and the encoder outputs a fixed q: log p(x) is exact."""
    m = fastvae.VAE(784, 16, 2)
    with torch.no_grad():
        for layer in (m.fc1, m.fc21, m.fc22, m.fc3, m.fc4):
            layer.weight.zero_()
        m.fc21.bias.fill_(mu_q)
        m.fc22.bias.fill_(logvar_q)
        m.fc4.bias.copy_(torch.linspace(-3, 3, 784))
    return m


def test_iwae_equals_exact_log_likelihood_when_q_is_the_prior():
    m = _constant_decoder_model(0.0, 0.0)
    x = torch.randint(0, 256, (5, 784), dtype=torch.uint8)
    exact = -F.binary_cross_entropy_with_logits(m.fc4.bias.expand(5, 784), x.float() / 255,
                                                 reduction="none").sum(1)
    ll = iw_log_likelihood(m, x, iw_samples=7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ll, exact.double(), rtol=0, atol=1e-3)  # float32 sums of ~800 nats


def test_iwae_converges_to_log_likelihood_with_many_samples_in_small_chunks():
    # q != p: each weight is noisy, but the K = 5000 estimate is within a few hundredths of log p(x)
    # (its standard error is ~0.01 here; dropping e.g. the logvar term of log q would be off by 0.3);
    # max_elements forces many chunks over both samples and images
    m = _constant_decoder_model(0.4, -0.3)
    x = torch.randint(0, 256, (6, 784), dtype=torch.uint8)
    exact = -F.binary_cross_entropy_with_logits(m.fc4.bias.expand(6, 784), x.float() / 255,
                                                 reduction="none").sum(1).double()
    gen = torch.Generator().manual_seed(1)
    ll = iw_log_likelihood(m, x, iw_samples=5000, generator=gen, max_elements=784 * 1500)
    torch.testing.assert_close(ll, exact, rtol=0, atol=0.06)
    # the single-sample ELBO is below by about KL(q || p) = 0.5 * sum(mu^2 + exp(lv) - 1 - lv)
    kl = 0.5 * 2 * (0.4 ** 2 + math.exp(-0.3) - 1 + 0.3)
    res = fastvae.evaluate(m, x, iw_samples=5000, generator=torch.Generator().manual_seed(2))
    assert res["elbo"] == pytest.approx(exact.mean().item() - kl, abs=0.5)
    assert res["iw_log_likelihood"] == pytest.approx(exact.mean().item(), abs=0.06)
    assert res["test_loss"] == -res["elbo"] and res["n"] == 6


def test_evaluate_rejects_bad_iw_samples(model):
    with pytest.raises(ValueError, match="iw_samples"):
        fastvae.evaluate(model, torch.rand(2, 784), iw_samples=-1)
