"""fastvae's Triton kernels registered as PyTorch operators (``torch.ops.fastvae.*``).

Each op is a ``torch.library.triton_op`` whose kernels are launched through ``wrap_triton``, with
its backward registered by ``torch.library.register_autograd``: ``torch.compile(fullgraph=True)``
traces through them without graph breaks and CUDA graphs capture them. Importing this module
fails with ImportError where triton is missing; fastvae then runs the PyTorch fallback only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import register_autograd, triton_op, wrap_triton

from .kernels import elbo as _elbo
from .kernels import reparam as _reparam

# True when TRITON_INTERPRET=1 was set before the kernels were defined: they then run on CPU.
KERNELS_INTERPRETED = type(_elbo._elbo_rows_kernel).__name__ == "InterpretedFunction"


@triton_op("fastvae::elbo", mutates_args={})
def elbo(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, beta: float, from_logits: bool,
         reduction: str) -> Tensor:
    return _elbo.elbo_forward(wrap_triton, recon, x, mu, logvar, beta, from_logits, reduction)


@triton_op("fastvae::elbo_backward", mutates_args={})
def elbo_backward(grad: Tensor, recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, beta: float,
                  from_logits: bool, reduction: str, x_grad: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _elbo.elbo_backward(wrap_triton, grad, recon, x, mu, logvar, beta, from_logits,
                               reduction, x_grad)


def _elbo_setup(ctx, inputs, output):
    recon, x, mu, logvar, beta, from_logits, reduction = inputs
    ctx.save_for_backward(recon, x, mu, logvar)
    ctx.args = (beta, from_logits, reduction)


def _elbo_grad(ctx, grad):
    recon, x, mu, logvar = ctx.saved_tensors
    x_grad = ctx.needs_input_grad[1]
    drecon, dx, dmu, dlogvar = torch.ops.fastvae.elbo_backward(
        grad, recon, x, mu, logvar, *ctx.args, x_grad)
    return drecon, (dx if x_grad else None), dmu, dlogvar, None, None, None


register_autograd("fastvae::elbo", _elbo_grad, setup_context=_elbo_setup)


@triton_op("fastvae::reparameterize", mutates_args={})
def reparameterize(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[Tensor]) -> Tensor:
    out_dtype = torch.promote_types(mu.dtype, logvar.dtype)
    return _reparam.reparam_forward(wrap_triton, mu, logvar, eps, seed, out_dtype)


@triton_op("fastvae::reparameterize_backward", mutates_args={})
def reparameterize_backward(grad: Tensor, logvar: Tensor, eps: Optional[Tensor],
                            seed: Optional[Tensor], eps_grad: bool) -> tuple[Tensor, Tensor]:
    return _reparam.reparam_backward(wrap_triton, grad, logvar, eps, seed, eps_grad)


def _reparam_setup(ctx, inputs, output):
    mu, logvar, eps, seed = inputs
    ctx.save_for_backward(logvar, eps, seed)
    ctx.mu_dtype = mu.dtype


def _reparam_grad(ctx, grad):
    logvar, eps, seed = ctx.saved_tensors
    eps_grad = eps is not None and ctx.needs_input_grad[2]
    dlogvar, deps = torch.ops.fastvae.reparameterize_backward(grad, logvar, eps, seed, eps_grad)
    dmu = grad if grad.dtype == ctx.mu_dtype else grad.to(ctx.mu_dtype)
    return dmu, dlogvar, (deps if eps_grad else None), None


register_autograd("fastvae::reparameterize", _reparam_grad, setup_context=_reparam_setup)
