"""Thin ``nn.Module`` wrappers over :mod:`fastvae.functional`."""
from __future__ import annotations

from torch import Tensor, nn

from . import functional as F
from ._backend import check_backend


class FusedELBO(nn.Module):
    """The VAE loss as a module: a drop-in for the classic ``loss_function(recon_x, x, mu, logvar)``.

    ``FusedELBO(from_logits=False)`` takes probabilities exactly like
    ``F.binary_cross_entropy(recon_x, x, reduction="sum") + KLD``; the default takes logits.
    """

    def __init__(self, reduction: str = "sum", beta: float = 1.0, from_logits: bool = True,
                 backend: str = "auto"):
        super().__init__()
        self.reduction = F.check_reduction(reduction)
        self.beta = float(beta)
        self.from_logits = bool(from_logits)
        self.backend = check_backend(backend)

    def forward(self, recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        return F.elbo_loss(recon, x, mu, logvar, reduction=self.reduction, beta=self.beta,
                           from_logits=self.from_logits, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, beta={self.beta}, from_logits={self.from_logits}, "
                f"backend={self.backend!r}")
