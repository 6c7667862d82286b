"""The classic VAE of Kingma & Welling and PyTorch's VAE example: a Bernoulli-decoder MLP."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._backend import check_backend
from .functional import reparameterize


def check_positive_int(name: str, value) -> None:
    """A ValueError unless ``value`` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class VAE(nn.Module):
    """``input_dim -> hidden_dim -> (mu, logvar) [latent_dim] -> hidden_dim -> input_dim`` logits.

    Layer names (``fc1``, ``fc21``, ``fc22``, ``fc3``, ``fc4``) are those of PyTorch's VAE example,
    so its state dicts load here. Inputs may be floats in [0, 1] or uint8 pixels (read as x/255),
    of any shape [B, ...] with ``input_dim`` elements per sample.
    """

    def __init__(self, input_dim: int = 784, hidden_dim: int = 400, latent_dim: int = 20,
                 backend: str = "auto"):
        super().__init__()
        for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("latent_dim", latent_dim)):
            check_positive_int(name, value)
        check_backend(backend)
        self.input_dim, self.hidden_dim, self.latent_dim = input_dim, hidden_dim, latent_dim
        self.backend = backend
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, latent_dim)
        self.fc22 = nn.Linear(hidden_dim, latent_dim)
        self.fc3 = nn.Linear(latent_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, input_dim)

    @property
    def config(self) -> dict:
        return {"input_dim": self.input_dim, "hidden_dim": self.hidden_dim, "latent_dim": self.latent_dim}

    def prepare_input(self, x: Tensor) -> Tensor:
        """``x`` [B, ...] as float [B, input_dim] in the weights' dtype (uint8 pixels / 255)."""
        if x.dim() < 1 or x.numel() != x.shape[0] * self.input_dim:
            raise ValueError(f"expected inputs [B, ...] with {self.input_dim} elements per sample, "
                             f"got shape {tuple(x.shape)}")
        x = x.reshape(x.shape[0], self.input_dim)
        if x.dtype == torch.uint8:
            return x.to(self.fc1.weight.dtype).mul_(1.0 / 255.0)
        return x.to(self.fc1.weight.dtype)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z | x), each [B, latent_dim]."""
        h = F.relu(self.fc1(self.prepare_input(x)))
        return self.fc21(h), self.fc22(h)

    def decode_logits(self, z: Tensor) -> Tensor:
        """Bernoulli logits of p(x | z), [B, input_dim]."""
        return self.fc4(F.relu(self.fc3(z)))

    def decode(self, z: Tensor) -> Tensor:
        """Pixel probabilities of p(x | z), [B, input_dim]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None,
                eps: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """(recon_logits, mu, logvar), with z from :func:`fastvae.reparameterize`: its noise drawn
        in the kernel from ``generator``, or the given ``eps`` [B, latent_dim]."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, eps=eps, generator=generator, backend=self.backend)
        return self.decode_logits(z), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` images decoded from z ~ N(0, I): probabilities [n, input_dim]."""
        w = self.fc3.weight
        z = torch.randn(n, self.latent_dim, device=w.device, dtype=w.dtype, generator=generator)
        return self.decode(z)


@torch.no_grad()
def decode_latents(model: VAE, z: Union[Tensor, Sequence[Sequence[float]]]) -> Tensor:
    """Decode chosen latent points, e.g. ``[[0.5, 0], [2, 0]]``: probabilities [n, input_dim]."""
    w = model.fc3.weight
    z = torch.as_tensor(z, dtype=w.dtype, device=w.device)
    if z.dim() == 1:
        z = z.unsqueeze(0)
    if z.dim() != 2 or z.shape[1] != model.latent_dim:
        raise ValueError(f"z must be [n, {model.latent_dim}] for this model's latent_dim; got {tuple(z.shape)}")
    return model.decode(z)
