"""The installed layout promised to users: kernels/ is fastvae.kernels, never a top-level module."""
import subprocess
import sys


def test_kernels_install_as_fastvae_kernels_only(tmp_path):
    code = ("import importlib.util, pathlib\n"
            "import fastvae.kernels.elbo as e, fastvae.kernels.reparam as r\n"
            "print(pathlib.Path(e.__file__).parent.name, pathlib.Path(r.__file__).parent.name)\n"
            "print(importlib.util.find_spec('kernels'))\n")
    # run outside the checkout, so only what the install put on sys.path is importable
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[:2]
    assert first == "kernels kernels"
    assert second == "None"


def test_import_without_a_gpu_leaves_the_compiler_stack_unloaded(tmp_path):
    """On a machine where the Triton ops cannot run (no CUDA, no interpreter) ``import fastvae``
    does not register them, so torch's compiler stack (which registering them imports)
    stays unloaded; they register on first use."""
    import os

    code = ("import sys, torch, fastvae\n"
            "print(torch.cuda.is_available(), 'torch._dynamo' in sys.modules)\n"
            "print(fastvae.triton_available(), hasattr(torch.ops.fastvae, 'elbo'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    cuda, compiler_stack = lines[0].split()
    if cuda == "False":  # with CUDA the ops register at import, as they should
        assert compiler_stack == "False"
    assert lines[1] == "True True"  # registered on first use
