"""Command line: ``python -m fastvae train|evaluate|decode|compare-latents ...`` (also ``fastvae ...``)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional, Sequence

from ._backend import BACKENDS
from .data import DATASETS, DataError
from .training import DEFAULTS, PRECISIONS, RunWriteError, TrainingDiverged


def _latent_point(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a latent point is comma-separated numbers like 0.5,0; got {text!r}")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="auto (default): full MNIST where it can be had, else the offline mnist-5k")
    p.add_argument("--data-dir", default=None, help="folder holding the IDX files, or where downloads go")
    p.add_argument("--epochs", type=int, default=None, help=f"total epochs (default {DEFAULTS['epochs']})")
    p.add_argument("--hidden-dim", type=int, default=None, help=f"default {DEFAULTS['hidden_dim']}")
    p.add_argument("--batch-size", type=int, default=None, help=f"global batch (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, default=None, help=f"Adam's learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--beta", type=float, default=None, help="weight of the KL term (default 1)")
    p.add_argument("--seed", type=int, default=None, help=f"default {DEFAULTS['seed']}")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="fastvae op backend")
    p.add_argument("--compile", action="store_true", help="torch.compile the step (CUDA graphs on GPU)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, run each step eagerly instead of as one replayed CUDA graph")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 autocast on a CPU with native bf16 (AVX512-BF16/AMX), "
                        "else fp32; the log says which and why")
    p.add_argument("--amp", action="store_true", help="the same as --precision bf16")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, such a folder is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvae", description="Train and inspect the classic VAE with "
                                     "fastvae's fused loss.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a VAE; writes metrics.json, checkpoint.pt and figures to --out")
    _add_train_options(p)
    p.add_argument("--latent-dim", type=int, default=None, help=f"default {DEFAULTS['latent_dim']}")
    p.add_argument("--out", default="runs/vae", help="output folder (default runs/vae)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--iw-samples", type=int, default=0,
                   help="K > 0: also compute the IWAE bound of log p(x) with K samples at the end")
    p.add_argument("--objective", choices=("elbo", "iwae"), default=None,
                   help="elbo (default) or iwae: train on the K-sample importance-weighted bound")
    p.add_argument("--train-samples", type=int, default=None,
                   help="K of --objective iwae (samples per image in the training loss)")
    p.add_argument("--no-figures", action="store_true", help="write no PNG figures")

    p = sub.add_parser("evaluate", help="test ELBO and IWAE bound of a trained run")
    p.add_argument("run", help="run folder (or checkpoint.pt)")
    p.add_argument("--iw-samples", type=int, default=5000, help="K for the IWAE bound (default 5000)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("decode", help="decode chosen latent points of a trained run into a PNG")
    p.add_argument("run", help="run folder (or checkpoint.pt)")
    p.add_argument("--z", type=_latent_point, action="append", required=True,
                   help="a latent point, e.g. --z 0.5,0 --z 2,0 (repeat for more)")
    p.add_argument("--out", default=None, help="PNG path (default: decoded.png in the run folder; "
                   "give one to decode a run in a read-only folder)")

    p = sub.add_parser("compare-latents", help="reconstructions at several latent sizes (default 20 and 5)")
    _add_train_options(p)
    p.add_argument("--latent-dims", type=int, nargs="+", default=[20, 5])
    p.add_argument("--out", default="runs/latent-comparison")
    return parser


def _train_kwargs(args) -> dict:
    return dict(epochs=args.epochs, hidden_dim=args.hidden_dim, batch_size=args.batch_size, lr=args.lr,
                beta=args.beta, seed=args.seed, device=args.device, backend=args.backend,
                compile=args.compile, precision=args.precision, amp=args.amp, overwrite=args.overwrite,
                progress=not args.no_progress, data_dir=args.data_dir, cuda_graph=not args.no_cuda_graph)


def _run(args) -> int:
    if args.command == "train":
        from .training import train

        result = train(args.dataset, latent_dim=args.latent_dim, out_dir=args.out, resume=args.resume,
                       iw_samples=args.iw_samples, figures=not args.no_figures, objective=args.objective,
                       train_samples=args.train_samples, **_train_kwargs(args))
        m = result.metrics
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line from rank 0 only
            print(f"final test loss {m['final_test_loss']:.2f} nats on {m['dataset']}; outputs in {args.out}")
    elif args.command == "evaluate":
        import torch

        from .data import load_dataset
        from .evaluate import evaluate
        from .training import load_checkpoint, resolve_device

        if args.iw_samples < 0:
            raise ValueError(f"--iw-samples must be >= 0, got {args.iw_samples}")
        device = resolve_device(args.device)
        model, ckpt = load_checkpoint(args.run, map_location=device)
        data = load_dataset(ckpt["dataset"], data_dir=args.data_dir, device=device)
        print(f"fastvae evaluate: test ELBO of {args.run} on {data.test_x.shape[0]} {data.name} test "
              f"images" + (f", then the IWAE bound with K={args.iw_samples} samples per image (the "
                           "longest part)" if args.iw_samples else ""), file=sys.stderr, flush=True)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        result = evaluate(model, data, iw_samples=args.iw_samples, generator=gen,
                          progress=not args.no_progress)
        if not all(math.isfinite(v) for v in result.values()):
            raise ValueError(f"the evaluation of {args.run} gave non-finite values ({result}); the "
                             "checkpoint's model is unusable")
        print(json.dumps({"dataset": data.name, **result}, indent=2, allow_nan=False))
    elif args.command == "decode":
        from .figures import save_decoded
        from .training import load_checkpoint

        from pathlib import Path

        model, _ = load_checkpoint(args.run)
        run = Path(args.run)
        out = args.out or (run if run.is_dir() else run.parent) / "decoded.png"
        try:
            print(f"wrote {save_decoded(model.eval(), args.z, out)}")
        except RunWriteError as e:  # e.g. a read-only run folder: a bad --out, exit 2
            raise ValueError(f"{e}; pass --out PATH to write the image elsewhere") from None
    else:
        from .figures import compare_latents

        kw = _train_kwargs(args)
        print(f"wrote {compare_latents(args.dataset or 'auto', args.latent_dims, args.out, **kw)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, TypeError, DataError, FileNotFoundError) as e:
        print(f"fastvae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"fastvae {args.command}: error: {e}", file=sys.stderr)
        return 3
    except RunWriteError as e:  # no space left, ...: the last checkpoint is intact
        print(f"fastvae {args.command}: error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print(f"fastvae {args.command}: interrupted; the last checkpoint is kept (resume with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
