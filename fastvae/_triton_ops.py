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

from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import register_autograd, triton_op, wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .kernels import elbo as _elbo
from .kernels import fused_decoder as _fused_decoder
from .kernels import reparam as _reparam
from .kernels.elbo import ELBOConfig
from .kernels.launch import Launcher, fresh_scratch, persistent_programs, stream_scratch

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


def _eager(recon: Tensor, *others) -> bool:
    """True where a kernel may be launched directly: nothing traces (no torch.compile, no
    dispatch mode such as make_fx's or FakeTensorMode, which would not see the launch) and every
    tensor is plain (a subclass's own __torch_dispatch__ must see the registered op). None
    entries are skipped."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or not _plain(recon):
        return False
    for t in others:
        if t is not None and not _plain(t):
            return False
    return True


def _apply_on_device(function, t: Tensor, *args):
    """``function.apply(t, *args)`` with t's CUDA device current (Triton launches on the current
    device, whatever the tensors'); the backward needs nothing: autograd runs a CUDA node's
    backward with its device current."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        with torch.cuda.device(t.device):
            return function.apply(t, *args)
    return function.apply(t, *args)


_LAUNCHERS: dict = {}


def _direct(kernel):
    """The eager launcher of ``kernel``: Triton's binder once per specialization, then its compiled
    launcher directly (``wrap_triton`` instead lets tracers record a launch)."""
    launcher = _LAUNCHERS.get(id(kernel))  # (a JITFunction's own hash is Python code)
    if launcher is None:
        launcher = _LAUNCHERS[id(kernel)] = Launcher(kernel)
    return launcher


@triton_op("fastvae::elbo", mutates_args={})
def elbo(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, sigma: Optional[Tensor], inv_sigma: float,
         log_norm: float, beta: float, free_bits: float, likelihood: str, from_logits: bool,
         reduction: str, grad: bool, x_grad: bool, sigma_grad: bool
         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = ELBOConfig(likelihood=likelihood, from_logits=from_logits, reduction=reduction,
                     inv_sigma=inv_sigma, log_norm=log_norm, beta=beta, free_bits=free_bits, grad=grad,
                     x_grad=x_grad, sigma_grad=sigma_grad)
    out = _elbo.elbo_forward(wrap_triton, recon, x, mu, logvar, sigma, cfg, fresh_scratch)
    # an op's outputs may not alias: a new empty tensor for each buffer not asked for
    return tuple(t if t is not None else recon.new_empty(0) for t in out)


@triton_op("fastvae::elbo_scale_grads_", mutates_args={"drecon", "dx", "dsigma", "dmu", "dlogvar"})
def elbo_scale_grads_(grad: Tensor, beta: float, drecon: Tensor, dx: Tensor, dsigma: Tensor, dmu: Tensor,
                      dlogvar: Tensor, active: Tensor) -> None:
    _elbo.scale_grads_(wrap_triton, grad, beta, drecon, dx, dsigma, dmu, dlogvar, active,
                       persistent_programs(drecon.device))


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


def _no_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastvae.elbo_loss: double backward (create_graph=True, torch.autograd.functional."
            "hessian, ...) is not supported on the Triton path, whose gradients are written in "
            "the forward pass; use backend='torch', which supports it")


def _no_gradient_written() -> RuntimeError:
    return RuntimeError("fastvae.elbo_loss: no gradient was computed in the forward pass (it ran "
                        "under torch.no_grad, or no input required grad)")


_SECOND_BACKWARD = (
    "fastvae.elbo_loss writes its gradients during the forward pass and hands them over in "
    "the first backward; a second backward through the same graph (retain_graph=True) is "
    "not supported on the Triton path: compute the loss again, or use backend='torch'")


def _elbo_setup(ctx, inputs, output):
    ctx.grad_written, ctx.x_grad, ctx.sigma_grad = inputs[-3:]
    ctx.beta = inputs[7]
    ctx.mark_non_differentiable(*output[1:])
    # the gradient buffers are outputs too: left to its default, autograd would hand the backward
    # a zero-filled tensor for each of them (a [B, N] memset per step, a third more traffic)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[1:])


def _elbo_grad(ctx, g, *_unused):
    # the registered op's backward (what torch.compile and the dispatch modes see)
    if not ctx.grad_written:
        raise _no_gradient_written()
    try:
        drecon, dx, dsigma, dmu, dlogvar, active = ctx.saved_tensors
    except RuntimeError as e:  # the version check: an earlier backward already scaled them
        raise RuntimeError(_SECOND_BACKWARD) from e
    if _traced(g):
        # a traced in-place update of a saved tensor would be preceded by a copy of it
        f_pix, f_lat = _factors(g, ctx.beta, active)
        drecon, dx, dsigma = (_times(t, f_pix) for t in (drecon, dx, dsigma))
        dmu, dlogvar = (_times(t, f_lat) for t in (dmu, dlogvar))
    else:
        _no_double_backward()
        torch.ops.fastvae.elbo_scale_grads_(g, ctx.beta, drecon, dx, dsigma, dmu, dlogvar, active)
    return (drecon, (dx if ctx.x_grad else None), dmu, dlogvar,
            (dsigma if ctx.sigma_grad else None)) + (None,) * 10


register_autograd("fastvae::elbo", _elbo_grad, setup_context=_elbo_setup)


class _ELBO(torch.autograd.Function):
    """fastvae::elbo without the operator dispatch (eager mode; see the module's docstring): one
    output, the loss (or its terms), and the gradient buffers kept in ``ctx``."""

    @staticmethod
    def forward(ctx, recon, x, mu, logvar, sigma, cfg: ELBOConfig):
        out, *buffers = _elbo.elbo_forward(_direct, recon, x, mu, logvar, sigma, cfg, stream_scratch)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        # new tensors without history, kept as plain attributes (no reference cycle through ctx);
        # None once the first backward has scaled and handed them over
        ctx.buffers = buffers if cfg.grad else None
        return out

    @staticmethod
    def backward(ctx, g):
        cfg = ctx.cfg
        if not cfg.grad:
            raise _no_gradient_written()
        if ctx.buffers is None:  # the buffers were scaled and handed over already
            raise RuntimeError(_SECOND_BACKWARD)
        _no_double_backward()
        drecon, dx, dsigma, dmu, dlogvar, active = ctx.buffers
        ctx.buffers = None
        _elbo.scale_grads_(_direct, g, cfg.beta, drecon, dx, dsigma, dmu, dlogvar, active,
                           persistent_programs(drecon.device))
        return (drecon, dx if cfg.x_grad else None, dmu, dlogvar, dsigma if cfg.sigma_grad else None,
                None)


def elbo_apply(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, sigma: Optional[Tensor],
               cfg: ELBOConfig) -> Tensor:
    """The ELBO's output for ``cfg``: launched directly when nothing traces, else through
    ``torch.ops.fastvae.elbo`` (whose output always holds the terms)."""
    if _eager(recon, x, mu, logvar, sigma):
        return _apply_on_device(_ELBO, recon, x, mu, logvar, sigma, cfg)
    out = torch.ops.fastvae.elbo(recon, x, mu, logvar, sigma, cfg.inv_sigma, cfg.log_norm, cfg.beta,
                                 cfg.free_bits, cfg.likelihood, cfg.from_logits, cfg.reduction, cfg.grad,
                                 cfg.x_grad, cfg.sigma_grad)[0]
    return out if cfg.terms or cfg.reduction == "none" else out[0]


@triton_op("fastvae::reparameterize", mutates_args={})
def reparameterize(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[Tensor],
                   num_samples: int = 0) -> Tensor:
    # num_samples = 0: z [M, L]; K >= 1: z [K * M, L] (sample k in rows k*M .. k*M + M - 1)
    return _reparam.reparam_forward(wrap_triton, mu, logvar, eps, seed, num_samples)


@triton_op("fastvae::reparameterize_backward", mutates_args={})
def reparameterize_backward(grad: Tensor, logvar: Tensor, eps: Optional[Tensor],
                            seed: Optional[Tensor], eps_grad: bool,
                            num_samples: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    dmu, dlogvar, deps = _reparam.reparam_backward(wrap_triton, grad, logvar, eps, seed, eps_grad, num_samples)
    # an op's outputs may not alias: a new empty tensor for each one not computed
    return (dmu if dmu is not None else logvar.new_empty(0), dlogvar,
            deps if deps is not None else logvar.new_empty(0))


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
        if eps is not None or num_samples or mu.dtype != logvar.dtype:
            _reparam_setup(ctx, (mu, logvar, eps, seed, num_samples), z)
        else:  # drawn noise, one sample: what the backward needs, as plain attributes
            ctx.logvar_seed = (logvar, seed)
        return z

    @staticmethod
    def backward(ctx, grad):
        pair = getattr(ctx, "logvar_seed", None)
        if pair is None:
            return _reparam_grad(ctx, grad)
        # d mu = g (no kernel); d logvar = g eps exp(logvar / 2) / 2, eps drawn again from the seed
        logvar, seed = pair
        dlogvar = _reparam.reparam_backward(_direct, grad, logvar, None, seed, False)[1]
        return grad, dlogvar, None, None, None


def reparameterize_apply(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[Tensor],
                         num_samples: int) -> Tensor:
    """``torch.ops.fastvae.reparameterize(...)``, launched directly when nothing traces."""
    if _eager(mu, logvar, eps, seed):
        return _apply_on_device(_Reparameterize, mu, logvar, eps, seed, num_samples)
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
