"""Test setup: without a GPU, the Triton kernels run on CPU under Triton's interpreter.

TRITON_INTERPRET must be set before fastvae's kernels are defined, so this runs first.
"""
import os
import shutil


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


if not _gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def _interpreted() -> bool:
    import fastvae

    return fastvae.triton_available() and fastvae._backend.interpreter_enabled()


# (backend, device) pairs the op tests run on: the fallback on CPU (and CUDA when present), and
# the Triton kernels on CUDA, or on CPU under the interpreter. The fallback on CPU runs twice: with
# its fused loops (fastvae/_cpu_loops.py, the default for float32) and with them off (its ATen
# formulation, which float64, half inputs, torch.compile and machines without llvmlite run).
BACKEND_DEVICES = [("torch", "cpu", "loops"), ("torch", "cpu", "aten")]
if HAS_CUDA:
    BACKEND_DEVICES += [("torch", "cuda"), ("triton", "cuda")]
elif _interpreted():
    BACKEND_DEVICES += [("triton", "cpu")]


def use_formulation(name: str, monkeypatch) -> None:
    """Run the fallback's fused CPU loops ("loops", the default) or its ATen formulation ("aten")."""
    from fastvae import _cpu_loops

    if name == "aten":
        monkeypatch.setattr(_cpu_loops, "ENABLED", False)
    else:
        assert _cpu_loops.available(), "the fused CPU loops did not compile (is llvmlite installed?)"


@pytest.fixture(params=BACKEND_DEVICES, ids=lambda p: "-".join(p))
def backend_device(request, monkeypatch):
    backend, device, *formulation = request.param
    if formulation:
        use_formulation(formulation[0], monkeypatch)
    return backend, device
