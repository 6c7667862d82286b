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
