"""The environment of a process that runs torch at a forced ATen CPU dispatch level.

``ATEN_CPU_CAPABILITY`` (``avx2``, ``avx512``, ...) must be set before torch is imported, so the
suite (``--fastvae-cpu-levels``) and ``cpu_fallback.py`` run each level in a subprocess. Each such
process also gets an Inductor cache of its own (``TORCHINDUCTOR_CACHE_DIR``): torch.compile's
kernels follow the level (its C++ is vectorised for AVX2 under ``ATEN_CPU_CAPABILITY=avx2``, for
AVX-512 at the default level of an AVX-512 CPU), but its cache does not tell them apart. On this
project's AMD EPYC (Zen 5, torch 2.14.1) a process at the default level that loaded what an
``avx2`` process had cached aborted ("Fatal Python error: Aborted") in the compiled Gaussian loss.
"""
from __future__ import annotations

import os
import tempfile

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def level_env(level: str, env: dict | None = None) -> dict:
    """A copy of ``env`` (default: os.environ) with ATEN_CPU_CAPABILITY=level and an Inductor
    cache for that level alone: a subfolder of the caller's TORCHINDUCTOR_CACHE_DIR, or of the
    temporary folder."""
    env = dict(os.environ if env is None else env)
    env["ATEN_CPU_CAPABILITY"] = level
    base = env.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "torchinductor_fastvae")
    env[CACHE_ENV] = os.path.join(base, f"aten-{level.lower()}")
    return env
