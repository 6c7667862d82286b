"""fastvae's Triton kernels registered as PyTorch operators (``torch.ops.fastvae.*``).

Each op is a ``torch.library.triton_op`` whose kernels are launched through ``wrap_triton``, with
its backward registered by ``torch.library.register_autograd``: ``torch.compile(fullgraph=True)``
traces through them without graph breaks and CUDA graphs capture them. Importing this module
fails with ImportError where triton is missing; fastvae then runs the PyTorch fallback only.

The ELBO is single-pass: ``fastvae::elbo`` returns (loss, reconstruction, kl, kl_eff) in one
tensor and, when asked, the gradients of the reconstruction and of the KL, written in the same
pass. Its backward multiplies them in place by their factors (``fastvae::elbo_scale_grads_``: the
grad_outputs of the loss and of the components, beta and the free-bits mask, read on the device;
tiles whose factors are all 1 are left untouched), so a ``loss.backward()`` moves no further
bytes. Traced by torch.compile, where an in-place update of a saved tensor would be cloned
first, the backward multiplies with plain tensor ops, which inductor fuses where it can. Double
backward is refused with a message that names it.

Eager calls skip the operator machinery: ``elbo_apply`` and ``reparameterize_apply`` run the same
launchers, setup and backward from a ``torch.autograd.Function`` and launch the kernels directly.
A custom op's dispatch (schema defaults, the autograd wrapper, redispatch) cost 0.2 to 0.6 ms of
host time per call on this project's CPU, far more than the kernels themselves below a few
million elements. Whenever something traces (torch.compile, AOTAutograd, make_fx, any dispatch
mode), the registered ops run instead, so that the tracer records them.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import register_autograd, triton_op, wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .kernels import elbo as _elbo
from .kernels import fused_decoder as _fused_decoder
from .kernels import reparam as _reparam

# True when TRITON_INTERPRET=1 was set before the kernels were defined: they then run on CPU.
KERNELS_INTERPRETED = type(_elbo._elbo_flat_kernel).__name__ == "InterpretedFunction"


def _plain(t: Tensor) -> bool:
    """A plain tensor (a Parameter too): not a fake or functional tensor nor any other subclass.
    Told apart in 0.3 us, where is_fake takes 4."""
    return (type(t) is Tensor or type(t) is torch.nn.Parameter) and not torch._is_functional_tensor(t)


def _traced(t: Tensor) -> bool:
    """True while torch.compile / AOTAutograd traces (fake or functional tensors)."""
    if torch.compiler.is_compiling():
        return True
    return not _plain(t) and is_fake(t)


def _eager(*tensors) -> bool:
    """True where a kernel may be launched directly: nothing traces (no torch.compile, no
    dispatch mode such as make_fx's or FakeTensorMode, which would not see the launch) and every
    tensor is plain (a subclass's own __torch_dispatch__ must see the registered op). None
    entries are skipped."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or _plain(t) for t in tensors)


def _direct(kernel):
    """The eager launcher: the kernel itself (``wrap_triton`` lets tracers record a launch)."""
    return kernel


def _on_device(t: Tensor):
    """t's CUDA device made current for the launches of an eager call (Triton launches on the
    current device, whatever the tensors' device); nothing to do on CPU or when it already is.
    The backward needs none: autograd runs a CUDA node's backward with its device current."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@triton_op("fastvae::elbo", mutates_args={})
def elbo(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, sigma: Optional[Tensor], inv_sigma: float,
         log_norm: float, beta: float, free_bits: float, likelihood: str, from_logits: bool,
         reduction: str, grad: bool, x_grad: bool, sigma_grad: bool
         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _elbo.elbo_forward(wrap_triton, recon, x, mu, logvar, sigma, inv_sigma, log_norm, beta,
                              free_bits, likelihood, from_logits, reduction, grad, x_grad, sigma_grad)


@triton_op("fastvae::elbo_scale_grads_", mutates_args={"drecon", "dx", "dsigma", "dmu", "dlogvar"})
def elbo_scale_grads_(grad: Tensor, beta: float, drecon: Tensor, dx: Tensor, dsigma: Tensor, dmu: Tensor,
                      dlogvar: Tensor, active: Tensor) -> None:
    _elbo.scale_grads_(wrap_triton, grad, beta, drecon, dx, dsigma, dmu, dlogvar, active)


def _factors(g: Tensor, beta: float, active: Tensor) -> tuple[Tensor, Tensor]:
    """The backward's factors as plain tensor ops (see ``_scale_grads_kernel``): for the pixel
    gradients ``g0 + g1``, for the latent ones ``(beta g0 + g3) active + g2``, shaped to broadcast
    against [B, N] and [B, L]."""
    if g.dim() == 2:
        g = g[:, :, None]                       # [4, B, 1]: per row
    w = beta * g[0] + g[3]
    if active.numel():
        w = w * active
    return g[0] + g[1], w + g[2]


def _times(buf: Tensor, f: Tensor) -> Tensor:
    # buf * factor as plain tensor ops: inductor fuses them into whatever consumes the gradient
    if buf.numel() == 0:
        return buf
    return (buf * f).to(buf.dtype)


def _elbo_setup(ctx, inputs, output):
    ctx.grad_written, ctx.x_grad, ctx.sigma_grad = inputs[-3:]
    ctx.beta = inputs[7]
    ctx.mark_non_differentiable(*output[1:])
    # the gradient buffers are outputs too: left to its default, autograd would hand the backward
    # a zero-filled tensor for each of them (a [B, N] memset per step, a third more traffic)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[1:])


def _elbo_grad(ctx, g, *_unused):
    if not ctx.grad_written:
        raise RuntimeError("fastvae.elbo_loss: no gradient was computed in the forward pass (it ran "
                           "under torch.no_grad, or no input required grad)")
    try:
        drecon, dx, dsigma, dmu, dlogvar, active = ctx.saved_tensors
    except RuntimeError as e:  # the version check: an earlier backward already scaled them
        raise RuntimeError(
            "fastvae.elbo_loss writes its gradients during the forward pass and hands them over in "
            "the first backward; a second backward through the same graph (retain_graph=True) is "
            "not supported on the Triton path: compute the loss again, or use backend='torch'") from e
    if _traced(g):
        # a traced in-place update of a saved tensor would be preceded by a copy of it
        f_pix, f_lat = _factors(g, ctx.beta, active)
        drecon, dx, dsigma = (_times(t, f_pix) for t in (drecon, dx, dsigma))
        dmu, dlogvar = (_times(t, f_lat) for t in (dmu, dlogvar))
    else:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fastvae.elbo_loss: double backward (create_graph=True, torch.autograd.functional."
                "hessian, ...) is not supported on the Triton path, whose gradients are written in "
                "the forward pass; use backend='torch', which supports it")
        if _eager(g):
            _elbo.scale_grads_(_direct, g, ctx.beta, drecon, dx, dsigma, dmu, dlogvar, active)
            # written in place behind autograd's back: bump the versions as the op would, so that
            # a second backward through the graph is refused (above) rather than scaled twice
            for t in (drecon, dx, dsigma, dmu, dlogvar):
                torch.autograd.graph.increment_version(t)
        else:
            torch.ops.fastvae.elbo_scale_grads_(g, ctx.beta, drecon, dx, dsigma, dmu, dlogvar, active)
    return (drecon, (dx if ctx.x_grad else None), dmu, dlogvar,
            (dsigma if ctx.sigma_grad else None)) + (None,) * 10


register_autograd("fastvae::elbo", _elbo_grad, setup_context=_elbo_setup)


class _ELBO(torch.autograd.Function):
    """fastvae::elbo without the operator dispatch (eager mode; see the module's docstring)."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _elbo.elbo_forward(_direct, *inputs)
        _elbo_setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        return _elbo_grad(ctx, *grads)


def elbo_apply(recon: Tensor, *args) -> tuple[Tensor, ...]:
    """``torch.ops.fastvae.elbo(recon, *args)``, launched directly when nothing traces."""
    if _eager(recon, *args[:4]):  # recon, x, mu, logvar, sigma
        with _on_device(recon):
            return _ELBO.apply(recon, *args)
    return torch.ops.fastvae.elbo(recon, *args)


@triton_op("fastvae::reparameterize", mutates_args={})
def reparameterize(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[Tensor],
                   num_samples: int = 0) -> Tensor:
    # num_samples = 0: z [M, L]; K >= 1: z [K * M, L] (sample k in rows k*M .. k*M + M - 1)
    return _reparam.reparam_forward(wrap_triton, mu, logvar, eps, seed, num_samples)


@triton_op("fastvae::reparameterize_backward", mutates_args={})
def reparameterize_backward(grad: Tensor, logvar: Tensor, eps: Optional[Tensor],
                            seed: Optional[Tensor], eps_grad: bool,
                            num_samples: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    return _reparam.reparam_backward(wrap_triton, grad, logvar, eps, seed, eps_grad, num_samples)


def _reparam_setup(ctx, inputs, output):
    mu, logvar, eps, seed, num_samples = inputs
    ctx.save_for_backward(logvar, eps, seed)
    ctx.mu_dtype = mu.dtype
    ctx.num_samples = num_samples


def _reparam_grad(ctx, grad):
    logvar, eps, seed = ctx.saved_tensors
    eps_grad = eps is not None and ctx.needs_input_grad[2]
    if _eager(grad):
        dmu, dlogvar, deps = _reparam.reparam_backward(_direct, grad, logvar, eps, seed, eps_grad,
                                                       ctx.num_samples)
    else:
        dmu, dlogvar, deps = torch.ops.fastvae.reparameterize_backward(grad, logvar, eps, seed, eps_grad,
                                                                       ctx.num_samples)
    if not ctx.num_samples:  # one sample: d mu is the upstream gradient itself
        dmu = grad
    dmu = dmu if dmu.dtype == ctx.mu_dtype else dmu.to(ctx.mu_dtype)
    return dmu, dlogvar, (deps if eps_grad else None), None, None


register_autograd("fastvae::reparameterize", _reparam_grad, setup_context=_reparam_setup)


class _Reparameterize(torch.autograd.Function):
    """fastvae::reparameterize without the operator dispatch (eager mode)."""

    @staticmethod
    def forward(ctx, mu, logvar, eps, seed, num_samples):
        z = _reparam.reparam_forward(_direct, mu, logvar, eps, seed, num_samples)
        _reparam_setup(ctx, (mu, logvar, eps, seed, num_samples), z)
        return z

    @staticmethod
    def backward(ctx, grad):
        return _reparam_grad(ctx, grad)


def reparameterize_apply(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[Tensor],
                         num_samples: int) -> Tensor:
    """``torch.ops.fastvae.reparameterize(...)``, launched directly when nothing traces."""
    if _eager(mu, logvar, eps, seed):
        with _on_device(mu):
            return _Reparameterize.apply(mu, logvar, eps, seed, num_samples)
    return torch.ops.fastvae.reparameterize(mu, logvar, eps, seed, num_samples)


# ---- the fused decoder output layer + log-likelihood (IWAE) -------------------------------------

@triton_op("fastvae::decoder_log_px", mutates_args={})
def decoder_log_px(h: Tensor, weight: Tensor, bias: Optional[Tensor], x: Tensor, group: int,
                   likelihood: str, sigma: float) -> Tensor:
    # log p(x | z) per row of h [M, H]; row r's target is x[(r // group) % x.shape[0]]
    return _fused_decoder.decoder_log_px(wrap_triton, h, weight, bias, x, group, likelihood, sigma)


@triton_op("fastvae::decoder_dlogits", mutates_args={})
def decoder_dlogits(h: Tensor, weight: Tensor, bias: Optional[Tensor], x: Tensor, g: Tensor, group: int,
                    likelihood: str, sigma: float) -> Tensor:
    # g[r] * d nll / d logits for a chunk of rows: [M, D] fp32 (the backward of decoder_log_px)
    return _fused_decoder.decoder_dlogits(wrap_triton, h, weight, bias, x, g, group, likelihood, sigma)
