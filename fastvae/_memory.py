"""Fresh CPU buffers that fault in 2 MB pages at a time (Linux transparent huge pages).

Each backward needs a new gradient as large as the decoder's output (d recon: 205 MB at B = 65536 in
float32). glibc serves an allocation that large with a fresh ``mmap``, and the first write to each
4 KB page of it is a page fault: 50,177 faults per call, which on this project's 2-core EPYC took
most of the call (the Gaussian's fused loop into a fresh buffer, B = 65536: 151 ms with 1 thread,
94 ms with 2; into the same buffer advised for huge pages, 610 faults and 42 / 35 ms, median of 20
alternating calls). ``madvise(MADV_HUGEPAGE)`` on the buffer's 2 MB-aligned interior lets the
kernel back it with 2 MB pages where the host's THP mode allows (``madvise`` or ``always`` in
``/sys/kernel/mm/transparent_hugepage/enabled``; with ``never`` the call is accepted and changes
nothing). It is what PyTorch itself does for every allocation of 2 MB and more when
``THP_MEM_ALLOC_ENABLE=1`` is set; here it applies only to the buffers fastvae owns and fills
entirely, so it costs no memory: one system call per buffer of at least 4 MB (two huge pages).

``FASTVAE_HUGE_PAGES=0`` (read at import) turns it off; so does a platform without ``madvise`` or
``MADV_HUGEPAGE``.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os

import torch
from torch import Tensor

ENABLED = os.environ.get("FASTVAE_HUGE_PAGES", "1") != "0"

_HUGE_PAGE = 1 << 21
# below two huge pages a buffer's aligned interior holds at most one: not worth the system call
MIN_BYTES = 2 * _HUGE_PAGE

_madvise = None  # libc's madvise (ctypes), looked up on first use; False where there is none


def _libc_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            try:
                fn = ctypes.CDLL(None).madvise
            except (OSError, AttributeError):  # no C library symbols in this process
                fn = None
            if fn is not None:
                fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                fn.restype = ctypes.c_int
                _madvise = (fn, advice)
    return _madvise


def advise_huge_pages(t: Tensor) -> bool:
    """Ask for 2 MB pages under ``t``'s memory (the 2 MB-aligned part of it), before it is first
    written; whether the advice was given (a CPU tensor of at least MIN_BYTES, Linux, not turned
    off). The memory must be ``t``'s alone: only call it on a tensor just allocated."""
    if not ENABLED or t.device.type != "cpu":
        return False
    storage = t.untyped_storage()
    n = storage.nbytes()
    if n < MIN_BYTES:
        return False
    libc = _libc_madvise()
    if not libc:
        return False
    start = storage.data_ptr()
    lo = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    hi = (start + n) & ~(_HUGE_PAGE - 1)
    if hi <= lo:
        return False
    fn, advice = libc
    return fn(lo, hi - lo, advice) == 0


def empty(shape, dtype: torch.dtype, device=None) -> Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, advised for huge pages (see
    :func:`advise_huge_pages`) when it is a large CPU buffer. A small one costs one size check
    more than ``torch.empty`` (the op's buffers at small batches, where every microsecond shows)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if math.prod(shape) * dtype.itemsize >= MIN_BYTES:
        advise_huge_pages(t)
    return t
