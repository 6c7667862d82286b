"""What the real-client scripts share: their run options, and fastvae imported for the chosen
backend (through the environment, so each port's lines stay exactly as the README gives them)."""
from __future__ import annotations

import argparse
import os

import torch


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")


def import_fastvae(args: argparse.Namespace):
    """fastvae with ``args.backend`` as its default backend (``triton`` on CPU runs the kernels
    under Triton's interpreter, which must be set before triton is imported), torch on
    ``args.threads`` threads."""
    os.environ["FASTVAE_BACKEND"] = args.backend
    if args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import fastvae

    torch.set_num_threads(args.threads)
    return fastvae
