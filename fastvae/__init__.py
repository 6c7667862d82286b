"""fastvae: fused Triton kernels for variational autoencoders, with a PyTorch fallback.

The Triton ops (``torch.ops.fastvae.*``, whose registration imports torch's compiler stack) are
registered at import where they can run, on a machine with CUDA or under Triton's interpreter,
and otherwise on first use (``backend="triton"``, ``fastvae.triton_available()``).
"""
import os

import torch

from ._backend import default_backend, triton_available
from .functional import elbo_loss, reparameterize
from .iwae import iwae_loss
from .modules import FusedELBO

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available():
    try:  # registers torch.ops.fastvae.* where triton is importable
        from . import _triton_ops  # noqa: F401
    except ImportError:
        pass

__version__ = "0.1.0"

__all__ = ["elbo_loss", "reparameterize", "iwae_loss", "FusedELBO", "default_backend", "triton_available"]

from .data import Dataset, load_dataset  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .model import VAE, decode_latents  # noqa: E402
from .training import TrainResult, load_checkpoint, train  # noqa: E402

__all__ += ["VAE", "decode_latents", "train", "TrainResult", "load_checkpoint", "evaluate", "Dataset",
            "load_dataset"]
