"""Thin ``nn.Module`` wrappers over :mod:`fastvae.functional`."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from . import functional as F
from ._backend import check_backend


class FusedELBO(nn.Module):
    """The VAE loss as a module: a drop-in for the classic ``loss_function(recon_x, x, mu, logvar)``.

    ``FusedELBO(from_logits=False)`` takes probabilities exactly like
    ``F.binary_cross_entropy(recon_x, x, reduction="sum") + KLD``; the default takes logits. Every
    argument of :func:`fastvae.elbo_loss` but ``sigma`` is set once here (``beta`` may be changed
    between steps, e.g. by an annealing schedule, as a number or a 0-dim tensor); ``sigma`` is
    given here (a number or a fixed tensor) or per call (a learned tensor, as in sigma-VAE).
    """

    def __init__(self, reduction: str = "sum", beta: Union[float, Tensor] = 1.0,
                 likelihood: str = "bernoulli", sigma: Union[float, Tensor, None] = None,
                 free_bits: float = 0.0, from_logits: bool = True, return_components: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.reduction = F.check_reduction(reduction)
        self.likelihood = F.check_likelihood(likelihood)
        # every argument is checked here, not at the first call: beta, free_bits, a number sigma
        # (a sigma tensor's shape is checked against recon at each call)
        F._beta_args(beta)
        F.check_free_bits(free_bits)
        if isinstance(sigma, Tensor) and self.likelihood == "gaussian":
            F._check_float("sigma", sigma)
        else:
            F._sigma_args(self.likelihood, sigma, None)
        self.beta = beta
        self.sigma = sigma
        self.free_bits = free_bits
        self.from_logits = F._check_bool("from_logits", from_logits)
        self.return_components = F._check_bool("return_components", return_components)
        self.backend = check_backend(backend)

    def forward(self, recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor,
                sigma: Union[float, Tensor, None] = None) -> Union[Tensor, F.ELBOComponents]:
        return F.elbo_loss(recon, x, mu, logvar, reduction=self.reduction, beta=self.beta,
                           likelihood=self.likelihood, sigma=self.sigma if sigma is None else sigma,
                           free_bits=self.free_bits, from_logits=self.from_logits,
                           return_components=self.return_components, backend=self.backend)

    def extra_repr(self) -> str:
        sigma: Optional[str] = None if self.sigma is None else (
            f"tensor{tuple(self.sigma.shape)}" if isinstance(self.sigma, Tensor) else repr(self.sigma))
        parts = [f"reduction={self.reduction!r}", f"beta={self.beta}", f"likelihood={self.likelihood!r}"]
        if sigma is not None:
            parts.append(f"sigma={sigma}")
        if self.free_bits:
            parts.append(f"free_bits={self.free_bits}")
        parts += [f"from_logits={self.from_logits}", f"return_components={self.return_components}",
                  f"backend={self.backend!r}"]
        return ", ".join(parts)
