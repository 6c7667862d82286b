"""Backend selection: which implementation (Triton kernels or the PyTorch fallback) runs an op."""
from __future__ import annotations

import os
import platform
import sys

import torch
import torch.autograd.forward_ad as _forward_ad

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FASTVAE_BACKEND"
TRITON_OPS = __package__ + "._triton_ops"  # the module that registers the Triton ops


_IMPORT_ERROR: str | None = None
_WARNED_FALLBACK_ON_CUDA = False


def triton_available() -> bool:
    """True when triton imports and fastvae's kernels can be built."""
    global _IMPORT_ERROR
    if sys.modules.get(TRITON_OPS) is not None:  # imported already: a dict lookup, per op call
        return True
    try:
        from . import _triton_ops  # noqa: F401
    except ImportError as e:
        _IMPORT_ERROR = f"{type(e).__name__}: {e}"
        return False
    return True


def triton_unavailable_reason() -> str:
    """Why the Triton kernels do not import (the ImportError), or "" when they do: a missing
    triton package, or fastvae.kernels missing from a broken install."""
    return "" if triton_available() else (_IMPORT_ERROR or "")


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter was on when fastvae's kernels were defined."""
    if not triton_available():
        return False
    return sys.modules[TRITON_OPS].KERNELS_INTERPRETED


def check_backend(backend: str) -> str:
    """``backend`` if it is one of BACKENDS, else a ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def default_backend() -> str:
    """The backend that ``backend="auto"`` stands for before device dispatch (``$FASTVAE_BACKEND``)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"${ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


def forward_ad_on() -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level()`` (one attribute read)."""
    return getattr(_forward_ad, "_current_level", 0) >= 0


def has_tangents(*tensors: torch.Tensor) -> bool:
    """True when forward-mode AD is on and a tensor carries a tangent."""
    if not forward_ad_on():
        return False
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def resolve(backend: str, *tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op on ``tensors``.

    ``auto`` takes ``$FASTVAE_BACKEND`` first; if that is also ``auto``, CUDA tensors go to
    the Triton kernels (float64 and forward-mode AD's dual tensors stay on the PyTorch path,
    which supports them) and everything else to the fallback. ``triton`` is honoured or refused
    with a clear error, never silently replaced.
    """
    if backend not in BACKENDS:
        check_backend(backend)
    if backend == "auto":
        backend = default_backend()
    if backend == "auto":
        t = tensors[0]
        if t.is_cuda and t.dtype != torch.float64 and not has_tangents(*tensors):
            if triton_available():
                return "triton"
            _warn_fallback_on_cuda()
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend='triton' needs the triton package and fastvae's kernels, which do not "
                f"import here ({triton_unavailable_reason()}); install triton (Linux: pip install "
                "triton) or use backend='torch'"
            )
        if torch.float64 in [t.dtype for t in tensors]:
            raise TypeError(
                "backend='triton' computes in float32 and does not take float64 tensors; "
                "use backend='torch' (or 'auto') for float64"
            )
        if forward_ad_on() and has_tangents(*tensors):
            raise RuntimeError(
                "backend='triton' does not support forward-mode AD (dual tensors of "
                "torch.autograd.forward_ad): its kernels have no forward derivative; use "
                "backend='torch' (or 'auto'), which has one"
            )
        if not tensors[0].is_cuda and not interpreter_enabled():
            raise RuntimeError(
                f"backend='triton' got tensors on {tensors[0].device}: the Triton kernels run on "
                "CUDA tensors, or on CPU only under Triton's interpreter (set TRITON_INTERPRET=1 "
                "before fastvae is imported). Use backend='torch' or 'auto' for CPU tensors."
            )
    return backend


def hardware_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's model name (for results and logs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _warn_fallback_on_cuda() -> None:
    """Once per process: CUDA tensors went to the PyTorch fallback because the kernels do not
    import (a user would otherwise believe the Triton kernels ran)."""
    global _WARNED_FALLBACK_ON_CUDA
    if _WARNED_FALLBACK_ON_CUDA:
        return
    _WARNED_FALLBACK_ON_CUDA = True
    import warnings

    warnings.warn("fastvae: CUDA tensors, but the Triton kernels do not import "
                  f"({triton_unavailable_reason()}); the PyTorch fallback runs instead, which is "
                  "slower. Install triton (and fastvae with pip install -e .), or pass "
                  "backend='torch' to choose the fallback on purpose.", RuntimeWarning, stacklevel=3)
