"""The direct launcher (kernels/launch.py) picks the compiled kernel Triton's own binder picks, for
every kind of specialization (benchmarks/launcher_oracle.py, on the stub libcuda, in its own
process: the stub driver must be active before triton is imported)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_direct_launches_match_tritons_binder(tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.launcher_oracle", "--stub-dir", str(tmp_path)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode == 3:
        pytest.skip(out.stderr.strip())
    assert out.returncode == 0 and "0 mismatches" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]
    assert out.stdout.count(": ok ") == 33  # 11 calls x 3 rounds, each checked
