"""``fastvae.train()``: the classic VAE end to end, fast.

The hot loop keeps the whole data set on the training device as uint8, draws batches from a
per-epoch permutation (no DataLoader, no per-sample Python work), trains on logits with the fused
loss, steps a fused Adam (its kernel called directly, without ``torch.optim``'s per-step Python),
and accumulates the loss on the device: the host reads it once per epoch. Where the loss runs on
its PyTorch fallback (CPU) and nothing else asks for autograd (the plain VAE, one process, eager,
fp32/fp64, no hooks), the step's gradients are written out by hand (:mod:`fastvae._step`): the
same ATen calls and the same bits as autograd, without its per-node overhead.

Reproducibility: the model is initialised from ``seed``; two dedicated generators (one for the
permutations, one for the reparameterisation noise) are saved in every checkpoint, so a resumed
run on CPU reproduces the weights of an uninterrupted one exactly.

Multi-process: under ``torchrun`` (``WORLD_SIZE`` > 1) training runs with DDP (NCCL on GPU, gloo
on CPU). ``batch_size`` is the global batch: every rank draws the same permutation and takes its
slice of each batch, so the run follows the single-process math. Only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import math
import os
import pickle
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import optimizer as _optim

from ._backend import (check_backend, hardware_name, interpreter_enabled, triton_available,
                       triton_unavailable_reason)
from ._step import manual_step_supported, vae_elbo_grads
from .data import DATASETS, Dataset, load_dataset
from .evaluate import evaluate, neg_elbo_sum
from .functional import reparameterize
from .graph_step import GraphStep, unsupported_reason
from .iwae import iwae_loss
from .model import VAE, check_positive_int
from .modules import FusedELBO

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
LOCK = ".fastvae.lock"
# every file a run writes into its folder: a new run refuses a folder holding any of them unless
# it resumes (checkpoint present) or overwrites
RUN_FILES = (CHECKPOINT, METRICS, "reconstructions.png", "samples.png", "loss_curve.png",
             "latent_scatter.png", "manifold.png")
PRECISIONS = ("auto", "fp32", "bf16")
# Hyperparameters: an explicit argument wins, else a resumed checkpoint's value, else this default.
DEFAULTS: dict[str, Any] = {
    "dataset": "auto", "epochs": 10, "latent_dim": 20, "hidden_dim": 400, "batch_size": 128,
    "lr": 1e-3, "beta": 1.0, "seed": 1, "objective": "elbo", "train_samples": 1,
}
OBJECTIVES = ("elbo", "iwae")
# keys that must not change when a run is resumed (epochs may grow)
_FIXED_ON_RESUME = ("latent_dim", "hidden_dim", "batch_size", "lr", "beta", "seed", "objective",
                    "train_samples")


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (on its device), the metrics, the output folder."""

    model: VAE
    metrics: dict
    out_dir: Optional[Path]


# ----------------------------------------------------------------------------- arguments
def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"auto"`` -> cuda when present, else cpu. A device that is not present raises ValueError."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but no CUDA GPU is available here "
                             "(torch.cuda.is_available() is False); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not present: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def choose_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(``"fp32"`` or ``"bf16"``, the reason) for ``precision`` in PRECISIONS on ``device``.

    ``"auto"``: bf16 autocast on a CPU with native bf16 (AVX512-BF16 / AMX), where its matmuls run
    about twice as fast and the test loss matches fp32's (the fused loss accumulates in fp32);
    fp32 elsewhere: on other CPUs bf16 is emulated and slower, and on GPUs fastvae has not yet
    been measured in bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision, "requested"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return "bf16", "auto: this CPU has native bf16 (AVX512-BF16/AMX), about 1.5x faster per epoch at the same test loss"
        return "fp32", "auto: this CPU has no native bf16 (no AVX512-BF16/AMX), where bf16 would be emulated and slower"
    return "fp32", "auto: fp32 on GPU (bf16 is opt-in there: --precision bf16)"


def _check_backend_device(backend: str, device: torch.device) -> None:
    """``backend="triton"`` that cannot run on ``device``: a ValueError before any work starts."""
    if backend != "triton":
        return
    if not triton_available():
        raise ValueError("backend 'triton' needs the triton package and fastvae's kernels, which do "
                         f"not import here ({triton_unavailable_reason()}); install triton or use "
                         "--backend auto")
    if device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"backend 'triton' runs on CUDA GPUs, not on {device.type} (unless Triton's "
                         "interpreter is on: TRITON_INTERPRET=1); use --backend auto or torch")


def _check_args(cfg: dict, backend: str, iw_samples: int, check_name: bool = True) -> None:
    if check_name and cfg["dataset"] not in DATASETS:
        raise ValueError(f"unknown dataset {cfg['dataset']!r}; choose one of {', '.join(DATASETS)}")
    for name in ("epochs", "latent_dim", "hidden_dim", "batch_size"):
        check_positive_int(name, cfg[name])
    if not (isinstance(cfg["lr"], (int, float)) and math.isfinite(cfg["lr"]) and cfg["lr"] > 0):
        raise ValueError(f"lr must be a positive number, got {cfg['lr']!r}")
    if not (isinstance(cfg["beta"], (int, float)) and math.isfinite(cfg["beta"]) and cfg["beta"] >= 0):
        raise ValueError(f"beta must be a number >= 0, got {cfg['beta']!r}")
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
        raise ValueError(f"seed must be an integer, got {cfg['seed']!r}")
    check_backend(backend)
    if isinstance(iw_samples, bool) or not isinstance(iw_samples, int) or iw_samples < 0:
        raise ValueError(f"iw_samples must be an integer >= 0, got {iw_samples!r}")
    if cfg["objective"] not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg['objective']!r}")
    check_positive_int("train_samples", cfg["train_samples"])
    if cfg["objective"] == "elbo" and cfg["train_samples"] != 1:
        raise ValueError(f"train_samples={cfg['train_samples']} is the K of objective='iwae'; the ELBO "
                         "objective draws one sample (pass objective='iwae')")
    if cfg["objective"] == "iwae" and cfg["beta"] != 1:
        raise ValueError(f"objective='iwae' is the importance-weighted bound, which has no KL weight; "
                         f"got beta={cfg['beta']!r} (leave it at 1)")


# ----------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: Union[str, torch.device, None]) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return _Dist(rank, world, local_rank, owns), dev


def _all_sum(t: Tensor, d: _Dist) -> Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- outputs
class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite: the run stopped, its last good checkpoint kept."""


class RunWriteError(OSError):
    """A run's file could not be written (no space left, a read-only folder, ...): nothing is left
    half-written, and the files written before (the last checkpoint) are as they were."""


def _why(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on its device"
    return e.strerror or str(e) or type(e).__name__


def write_failure(path: Path, e: OSError) -> RunWriteError:
    """One line naming ``path``'s folder and why it could not be written."""
    return RunWriteError(f"cannot write {path.name} in {path.parent}: {_why(e)}; nothing was "
                         "half-written and the earlier files there are intact")


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(fh)`` (a binary file) to a temp file beside ``path``, flush it to the
    disk, then rename it over ``path``: a crash or a full disk leaves the old file or the new one,
    never a part. An OSError is a :class:`RunWriteError` naming the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # a Python file object, not a path: torch.save's own writer turns ENOSPC into a
        # RuntimeError ("unexpected pos"), a file object's write raises the OSError
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save's zip writer, closing after a failed write, raises a RuntimeError of its own
        # over the OSError: the OSError is in its context
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise write_failure(path, cause) from e
    finally:
        tmp.unlink(missing_ok=True)


def _digest(tree: Any, h=None) -> str:
    """SHA-256 over a checkpoint's contents: every tensor's dtype, shape and bytes, every other
    value's repr, dict keys in sorted order. Independent of the zip container torch.save writes."""
    h = h or hashlib.sha256()
    if isinstance(tree, dict):
        h.update(b"{")
        for k in sorted(tree, key=repr):
            h.update(repr(k).encode())
            _digest(tree[k], h)
        h.update(b"}")
    elif isinstance(tree, (list, tuple)):
        h.update(b"[")
        for v in tree:
            _digest(v, h)
        h.update(b"]")
    elif isinstance(tree, Tensor):
        t = tree.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(tree).encode())
    return h.hexdigest()


def save_checkpoint(path: Union[str, Path], state: dict) -> None:
    """``torch.save`` atomically: a crash mid-write leaves the previous checkpoint intact. The
    checkpoint carries a SHA-256 of its contents (``"sha256"``), checked by :func:`read_checkpoint`."""
    state = {k: v for k, v in state.items() if k != "sha256"}
    state["sha256"] = _digest(state)
    _atomic_write(Path(path), lambda fh: torch.save(state, fh))


def _finite(x: Any) -> Any:
    """``x`` with non-finite floats replaced by None (strict JSON has no NaN or Infinity)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_metrics(path: Union[str, Path], metrics: dict) -> None:
    """metrics.json, atomically and as strict JSON (a non-finite number is written as null)."""
    text = json.dumps(_finite(metrics), indent=2, allow_nan=False) + "\n"
    _atomic_write(Path(path), lambda fh: fh.write(text.encode()))


def read_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict:
    """A checkpoint dict, verified: readable, its SHA-256 matching its contents, finite weights.
    Anything else is a ValueError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first (python -m fastvae train --out ...)")
    bad = f"{path} is not a usable fastvae checkpoint"
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False, i.e. running the file's code: never repeat it
        raise ValueError(f"{path} is not a fastvae checkpoint: it holds Python objects that a fastvae "
                         "checkpoint never holds (tensors and plain values only), and fastvae does not "
                         "unpickle such files") from None
    except Exception as e:
        lines = [ln for ln in str(e).strip().splitlines() if "weights_only" not in ln]
        detail = lines[0] if lines else type(e).__name__
        raise ValueError(f"{bad}: it cannot be read ({detail}); it is truncated or corrupt, or not a "
                         "fastvae checkpoint. Train again, or restore it from a copy") from None
    if (not isinstance(ckpt, dict) or not {"model", "model_config"} <= set(ckpt)
            or not isinstance(ckpt["model"], dict)
            or not all(isinstance(v, Tensor) for v in ckpt["model"].values())):
        raise ValueError(f"{bad}: it holds no fastvae model")
    if "sha256" in ckpt:
        stored = ckpt.pop("sha256")
        if _digest(ckpt) != stored:
            raise ValueError(f"{bad}: its contents do not match the SHA-256 stored in it (the file was "
                             "altered or damaged). Train again, or restore it from a copy")
    else:  # fastvae 0.1.0 before the run-folder checks (commit 18fc82e) wrote no hash
        warnings.warn(f"{path} carries no SHA-256 (written by an early fastvae 0.1.0): it is loaded "
                      "unverified; save it again (fastvae.training.save_checkpoint) to add one",
                      stacklevel=2)
    bad_params = [k for k, v in ckpt["model"].items() if not torch.isfinite(v).all()]
    if bad_params:
        raise ValueError(f"{bad}: non-finite weights in {', '.join(bad_params)}")
    return ckpt


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> tuple[VAE, dict]:
    """Load ``checkpoint.pt`` (or a run folder holding one): the model and the checkpoint dict.

    Raises FileNotFoundError when there is none, ValueError when it is truncated, altered (its
    SHA-256 does not match) or holds non-finite weights."""
    ckpt = read_checkpoint(path, map_location)
    try:
        model = VAE(**ckpt["model_config"], backend=ckpt.get("backend", "auto"))
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        raise ValueError(f"{path} is not a usable fastvae checkpoint ({e})") from e
    return model.to(map_location), ckpt


def _existing_outputs(out: Path) -> list[str]:
    """The run files (RUN_FILES) present in ``out``."""
    return [name for name in RUN_FILES if (out / name).exists()]


class RunFolder:
    """An output folder held for one run: checked writable, locked against a concurrent run (an
    ``flock`` that the OS drops when its holder dies, even by ``kill -9``), and cleared of the temp
    files an interrupted write leaves. Use as a context manager."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None

    def __enter__(self) -> "RunFolder":
        p = self.path
        if p.exists() and not p.is_dir():
            raise ValueError(f"output folder {p} is a file, not a folder; choose another --out")
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / f".fastvae-probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            self._fh = open(p / LOCK, "a+")
        except OSError as e:
            raise ValueError(f"cannot write to output folder {p} ({_why(e)}); choose a "
                             "writable --out") from None
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "unknown"
            self._fh.close()
            self._fh = None
            raise ValueError(f"output folder {p} is in use by another fastvae run (process {holder}); "
                             "wait for it to finish or choose another --out") from None
        try:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.write(f"{os.getpid()}\n")
            self._fh.flush()
        except OSError as e:
            self._fh.close()  # drops the lock
            self._fh = None
            raise ValueError(f"cannot write to output folder {p} ({_why(e)}); choose a "
                             "writable --out") from None
        # we hold the lock: every temp file here is left over from an interrupted write
        for tmp in list(p.glob(".*.tmp")) + list(p.glob(".fastvae-probe.*")):
            tmp.unlink(missing_ok=True)
        return self

    def existing_outputs(self) -> list[str]:
        return _existing_outputs(self.path)

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        for name in RUN_FILES:
            if name not in keep:
                (self.path / name).unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock; the file stays (removing it would race)
            self._fh = None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return hardware_name(device)
    return f"cpu ({hardware_name(device)}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- the loop
class _IWAEForward(torch.nn.Module):
    """The VAE's forward pass and the K-sample IWAE loss (:func:`fastvae.iwae_loss`) as one module,
    so that DDP wraps the whole computation (same parameters as the VAE it holds)."""

    def __init__(self, vae: VAE, num_samples: int):
        super().__init__()
        self.vae, self.num_samples = vae, num_samples

    def forward(self, xf: Tensor, generator: Optional[torch.Generator] = None,
                eps: Optional[Tensor] = None) -> Tensor:
        vae = self.vae
        mu, logvar = vae.encode(xf)
        z = reparameterize(mu, logvar, num_samples=self.num_samples, eps=eps, generator=generator,
                           backend=vae.backend)                       # [K, B, L]
        h = torch.relu(vae.fc3(z))                                     # [K, B, H]
        w, b = vae.fc4.weight, vae.fc4.bias
        dt = torch.float64 if w.dtype == torch.float64 else torch.float32
        with torch.autocast(xf.device.type, enabled=False):           # the loss in fp32 (or fp64)
            return iwae_loss(*(t.to(dt) for t in (h, w, b, xf, z, mu, logvar)), reduction="sum",
                             backend=vae.backend)


class Trainer:
    """One process's training state: model, optimizer, generators, the compiled or eager step.

    ``cfg`` needs ``batch_size``, ``lr``, ``beta`` and ``seed``. :func:`train` drives it; use it
    directly (with :func:`train_epoch`) to run fastvae's epoch loop inside your own code.

    :meth:`step` computes the plain VAE's gradients by hand where it can (see the module
    docstring) and through autograd otherwise, the same gradients either way; hooks on the model
    or its parameters, or on ``opt``, send it through autograd and ``opt.step()``.
    """

    def __init__(self, model: VAE, cfg: dict, device: torch.device, d: Optional[_Dist] = None,
                 backend: str = "auto", compile: bool = False, amp: bool = False, cuda_graph: bool = False):
        d = d or _Dist()
        self.model, self.cfg, self.device, self.d = model, cfg, device, d
        self.loss_fn = FusedELBO(reduction="sum", beta=cfg["beta"], backend=backend)
        # the step as one CUDA graph (fastvae.graph_step) where it applies
        self.graph_off = (unsupported_reason(device, d.world, compile, cfg.get("objective", "elbo"))
                          if cuda_graph else "turned off")
        adam_kw = {"fused": True} if device.type in ("cuda", "cpu") else {}
        if self.graph_off is None:
            adam_kw["capturable"] = True
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], **adam_kw)
        self._adam = None  # (state, param_groups, params, exp_avgs, exp_avg_sqs, steps): see optimizer_step
        # same permutation on every rank; distinct reparameterisation noise per rank
        self.perm_gen = torch.Generator(device=device).manual_seed(cfg["seed"])
        self.noise_gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 1 + d.rank)
        self.iwae = cfg.get("objective", "elbo") == "iwae"
        self.net = _IWAEForward(model, cfg["train_samples"]) if self.iwae else model
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(self.net, device_ids=ids)
            # the loss is summed over the global batch: its gradient is the sum of the ranks'
            self.net.register_comm_hook(state=None, hook=allreduce_sum_hook)
        # a graph replays the casts it captured: autocast's weight cache would go stale
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16,
                                        cache_enabled=self.graph_off is not None) if amp
                         else contextlib.nullcontext())
        self.forward_loss = self._forward_loss
        self.compiled = compile
        self.backend = backend
        # the hand-written gradients of fastvae._step (checked again at each step for the model)
        self._manual = (not compile and not amp and d.world == 1 and not self.iwae
                        and isinstance(cfg["beta"], (int, float)) and not isinstance(cfg["beta"], bool))
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPU
            self.forward_loss = torch.compile(self._forward_loss, mode=mode)
        self.graph = GraphStep(self) if self.graph_off is None else None

    def _forward_loss(self, xb: Tensor, eps: Optional[Tensor] = None) -> Tensor:
        xf = self.model.prepare_input(xb)  # uint8 -> float once, shared by the encoder and the loss
        # the Triton loss reads uint8 targets itself (4x fewer bytes); the CPU fallback takes xf
        target = xb if self.device.type == "cuda" else xf
        with self.autocast:
            if self.iwae:  # the K-sample bound: net is the encoder, K samples, decoder and loss
                return self.net(xf, generator=self.noise_gen) if eps is None else self.net(xf, eps=eps)
            if eps is None:
                logits, mu, logvar = self.net(xf, generator=self.noise_gen)
            else:
                logits, mu, logvar = self.net(xf, eps=eps)
            return self.loss_fn(logits, target, mu, logvar)

    def step(self, xb: Tensor) -> Tensor:
        """One optimizer step on the batch ``xb``; the batch's summed loss (0-dim, detached)."""
        if self._manual and manual_step_supported(self.model, self.backend):
            # the plain VAE on the fallback: the gradients by hand, as autograd gives them
            loss = vae_elbo_grads(self.model, xb, self.cfg["beta"], self.noise_gen)
            self.optimizer_step()
            return loss
        eps = None
        if self.compiled:
            # torch.compile cannot take a torch.Generator into its graph: the step's noise is drawn
            # from the run's generator outside it, so the forward and loss stay one graph
            shape = (xb.shape[0], self.model.latent_dim)
            if self.iwae:
                shape = (self.cfg["train_samples"], *shape)
            eps = torch.randn(shape, generator=self.noise_gen, device=self.device)
        loss = self.forward_loss(xb, eps)
        # under DDP the gradients are summed over ranks (allreduce_sum_hook), not averaged: the loss's
        # own gradient stays 1, so the fused loss hands over its gradients without a second pass
        loss.backward()
        self.optimizer_step()
        return loss.detach()

    def optimizer_step(self) -> None:
        """``opt.step()`` then ``opt.zero_grad(set_to_none=True)``, bit for bit, with the fused
        Adam kernel called directly once the optimizer's state exists: ``torch.optim``'s per-step
        Python (grouping the tensors by device and dtype, hooks, profiling records) cost about
        0.5 ms of an 8 ms CPU step. Anything the direct call does not cover (hooks, several
        parameter groups, amsgrad, a tensor lr, a missing gradient, a new state from
        ``load_state_dict``) goes through ``opt.step()`` and ``opt.zero_grad()``."""
        opt, cached = self.opt, self._adam
        if cached is None or cached[0] is not opt.state or cached[1] is not opt.param_groups:
            self._adam = cached = _direct_adam(opt)
        if cached is None or any(p.grad is None for p in cached[2]) or _optimizer_hooks(opt):
            opt.step()
            opt.zero_grad(set_to_none=True)
            return
        _, _, params, exp_avgs, exp_avg_sqs, steps = cached
        g = opt.param_groups[0]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps,
                           amsgrad=False, lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1],
                           weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
                           grad_scale=None, found_inf=None)
        for p in params:
            p.grad = None

    def batches(self, n: int) -> list[Tensor]:
        """This rank's index slices of one epoch's permutation, in global batches of ``batch_size``."""
        perm = torch.randperm(n, generator=self.perm_gen, device=self.device)
        out = []
        for idx in perm.split(self.cfg["batch_size"]):
            if self.d.world > 1:
                if idx.numel() < self.d.world:  # a last global batch too small to give every rank a row
                    continue
                idx = idx.tensor_split(self.d.world)[self.d.rank]
            out.append(idx)
        return out

    def rng_state(self) -> dict:
        noise = self.noise_gen.get_state()
        if self.d.world > 1:
            states: list = [None] * self.d.world
            dist.all_gather_object(states, noise)
        else:
            states = [noise]
        return {"perm": self.perm_gen.get_state(), "noise": states}

    def load_rng_state(self, state: dict) -> None:
        if len(state["noise"]) != self.d.world:
            raise ValueError(f"the checkpoint was written by {len(state['noise'])} process(es); resume "
                             f"it with the same number, not {self.d.world}")
        self.perm_gen.set_state(state["perm"])
        self.noise_gen.set_state(state["noise"][self.d.rank])


def allreduce_sum_hook(_state, bucket):
    """DDP communication hook: all-reduce a gradient bucket as a sum (DDP's default averages it,
    which a loss scaled by the world size would undo at the cost of rescaling every gradient)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _optimizer_hooks(opt: torch.optim.Optimizer) -> bool:
    return bool(opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
                or _optim._global_optimizer_pre_hooks or _optim._global_optimizer_post_hooks)


def _direct_adam(opt: torch.optim.Optimizer) -> Optional[tuple]:
    """What :meth:`Trainer.optimizer_step` needs to call the fused Adam kernel itself, or None where
    ``opt.step()`` must run: not a fused single-group Adam with plain options, or its state not
    created yet (the first step creates it)."""
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
        return None
    g = opt.param_groups[0]
    if not (g.get("fused") and not g["amsgrad"] and not g["maximize"] and not g["capturable"]
            and not g["differentiable"] and not g.get("decoupled_weight_decay", False)
            and not isinstance(g["lr"], Tensor) and not any(isinstance(b, Tensor) for b in g["betas"])):
        return None
    params = list(g["params"])
    states = [opt.state.get(p) for p in params]
    if not params or any(not s or "step" not in s for s in states):
        return None
    if len({(p.device, p.dtype) for p in params}) != 1:
        return None
    return (opt.state, opt.param_groups, params, [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["step"] for s in states])


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not enabled, unit="batch",
                dynamic_ncols=True, file=sys.stderr)


def train_epoch(trainer: Trainer, x: Tensor, desc: str = "train", progress: bool = False) -> Tensor:
    """One epoch over ``x`` (uint8 or float images on the device): the summed loss, on the device."""
    trainer.model.train()
    batches = trainer.batches(x.shape[0])
    if trainer.graph is not None:  # one replayed CUDA graph per step, the loss summed inside it
        trainer.graph.total.zero_()
        for idx in _progress(batches, len(batches), desc, progress):
            trainer.graph.run(x, idx)
        return trainer.graph.total.clone()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for idx in _progress(batches, len(batches), desc, progress):
        total += trainer.step(x.index_select(0, idx))
    return total


def _log(d: _Dist, message: str) -> None:
    if d.main:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)


def train(dataset: Union[str, Dataset, None] = None, *, epochs: Optional[int] = None,
          latent_dim: Optional[int] = None, hidden_dim: Optional[int] = None,
          batch_size: Optional[int] = None, lr: Optional[float] = None, beta: Optional[float] = None,
          seed: Optional[int] = None, device: Union[str, torch.device, None] = "auto",
          out_dir: Union[str, Path, None] = "runs/vae", backend: str = "auto", compile: bool = False,
          precision: str = "auto", amp: bool = False, resume: bool = False, overwrite: bool = False,
          iw_samples: int = 0, data_dir: Union[str, Path, None] = None, figures: bool = True,
          progress: bool = True, init: Optional[VAE] = None, objective: Optional[str] = None,
          train_samples: Optional[int] = None, cuda_graph: bool = True) -> TrainResult:
    """Train the classic VAE and write its outputs.

    Args:
        dataset: "auto" (default: full MNIST where it can be had, else the offline mnist-5k, with a
            printed message), "mnist", "fashion-mnist", "mnist-5k", or a loaded
            :class:`fastvae.data.Dataset`.
        epochs: total epochs (default 10); with ``resume`` training continues up to this count.
        latent_dim, hidden_dim: model size (defaults 20 and 400: the 784-400-20 VAE).
        batch_size: the global batch (default 128); lr: Adam's (default 1e-3); beta: KL weight (1).
        seed: model init, permutations and noise (default 1).
        device: "auto", "cpu", "cuda" or "cuda:N".
        out_dir: where metrics.json, checkpoint.pt and the figures go; None writes nothing. A folder
            that already holds a run is refused unless ``resume`` or ``overwrite``; a folder in use
            by another run is refused.
        backend: fastvae's op backend ("auto", "triton", "torch").
        compile: ``torch.compile`` the forward and loss (CUDA graphs on GPU).
        cuda_graph: on CUDA, run each training step as one replayed CUDA graph (forward, loss,
            backward, Adam; :mod:`fastvae.graph_step`), where it applies: one process, no
            ``compile``, the ELBO objective. metrics.json's "cuda_graph" says whether it ran.
        precision: "auto" (bf16 autocast on a CPU with native bf16, else fp32; see
            :func:`choose_precision`), "fp32" or "bf16". The log and metrics.json say which and why.
        amp: the same as ``precision="bf16"`` (kept for older code).
        resume: continue from ``out_dir/checkpoint.pt`` if there is one.
        overwrite: replace the run in ``out_dir``: its outputs are deleted when the first epoch of
            the new run has trained.
        iw_samples: K > 0 also computes the IWAE bound of log p(x) on the test set at the end.
        objective: "elbo" (default) or "iwae": the K-sample importance-weighted bound of Burda et
            al. (2016) with K = ``train_samples`` (:func:`fastvae.iwae_loss`; beta must stay 1).
            The per-epoch test loss stays the one-sample negative ELBO for both.
        train_samples: K of ``objective="iwae"`` (default 1, the ELBO's single sample).
        data_dir: where the IDX files are, or go when downloaded.
        figures: write the PNG figures; progress: show tqdm bars.
        init: start from this model's weights (copied; its sizes set latent_dim and hidden_dim)
            instead of a fresh initialisation from ``seed``.

    Returns:
        :class:`TrainResult` with the model, the metrics (as in metrics.json) and out_dir.

    Raises:
        ValueError for bad arguments (unknown dataset, latent_dim < 1, batch_size larger than the
        training set, a device that is not present, an output folder that holds a run, is in use,
        is a file or is not writable, an unreadable checkpoint to resume, ...), all before any
        training. :class:`TrainingDiverged` when the loss or the weights become non-finite: the
        last good checkpoint is kept.
    """
    explicit = {"dataset": dataset if not isinstance(dataset, Dataset) else None, "epochs": epochs,
                "latent_dim": latent_dim, "hidden_dim": hidden_dim, "batch_size": batch_size, "lr": lr,
                "beta": beta, "seed": seed, "objective": objective, "train_samples": train_samples}
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if init is not None:
        if not isinstance(init, VAE):
            raise TypeError(f"init must be a fastvae.VAE, got {type(init).__name__}")
        for key in ("latent_dim", "hidden_dim"):
            if explicit.setdefault(key, getattr(init, key)) != getattr(init, key):
                raise ValueError(f"{key}={explicit[key]} contradicts init's {key}={getattr(init, key)}")
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume needs out_dir: the folder whose checkpoint.pt to continue from")
    if resume and overwrite:
        raise ValueError("resume and overwrite contradict each other: choose one")
    if amp:
        if precision not in ("auto", "bf16"):
            raise ValueError(f"amp=True means bf16 and contradicts precision={precision!r}")
        precision = "bf16"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    # the arguments as given, checked before anything is read or written
    _check_args({**DEFAULTS, **explicit}, backend, iw_samples, check_name=not isinstance(dataset, Dataset))
    _check_backend_device(backend, resolve_device(device))

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    main = not multi or int(os.environ.get("RANK", "0")) == 0
    folder = RunFolder(out) if out is not None and main else None
    with folder or contextlib.nullcontext():
        ckpt = None
        if resume and (out / CHECKPOINT).is_file():
            ckpt = read_checkpoint(out / CHECKPOINT)
            changed = {k: (ckpt["config"][k], explicit[k]) for k in _FIXED_ON_RESUME
                       if k in explicit and explicit[k] != ckpt["config"][k]}
            if changed:
                raise ValueError("resume: these settings differ from the checkpoint's (saved, given): "
                                 + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in changed.items()))
            if "epochs" in explicit and explicit["epochs"] < ckpt["epoch"]:
                raise ValueError(f"resume: the run in {out} has already trained {ckpt['epoch']} epochs, "
                                 f"more than epochs={explicit['epochs']}; give more epochs to continue it")
        elif out is not None and not overwrite and _existing_outputs(out):
            # every rank checks (a read), so that under torchrun all stop, not rank 0 alone
            held = ", ".join(_existing_outputs(out))
            if resume:
                raise ValueError(f"output folder {out} holds run files ({held}) but no checkpoint to "
                                 "resume; pass --overwrite to replace them, or choose another --out")
            raise ValueError(f"output folder {out} already holds a run ({held}); pass --resume to "
                             "continue it, --overwrite to replace it, or choose another --out")
        # resuming without epochs= continues to the checkpoint's own target (an interrupted run
        # ends where it was meant to); epochs= extends or sets it
        cfg = {**DEFAULTS, **(ckpt["config"] if ckpt else {}), **explicit}
        if isinstance(dataset, Dataset):
            cfg["dataset"] = dataset.name
        _check_args(cfg, backend, iw_samples, check_name=not isinstance(dataset, Dataset))

        d, dev = _init_distributed(device)
        try:
            result = _train(cfg, dataset, dev, d, out, ckpt, backend, compile, precision, resume,
                            iw_samples, data_dir, figures, progress, init, cuda_graph,
                            clear=folder.clear if (folder is not None and overwrite) else None)
            if d.owns_group:
                # the ranks leave together: rank 0 may still be writing (and flushing) its files,
                # and a rank that tears its group down meanwhile aborted at exit now and then
                dist.barrier()
            return result
        finally:
            if d.owns_group:
                # the trainer (its DDP module holds the process group) sits in reference cycles:
                # collect it first, so that destroying the group ends gloo's threads now, not at
                # interpreter exit, where a thread still releasing an all_gather's tensors needs
                # the GIL and aborted the process ("terminate called without an active exception",
                # a rank in about 1 run in 8 on this project's AMD EPYC)
                gc.collect()
                dist.destroy_process_group()


def _train(cfg, dataset, dev, d, out, ckpt, backend, compile, precision, resume, iw_samples, data_dir,
           figures, progress, init, cuda_graph, clear=None) -> TrainResult:
    if resume and ckpt is None:
        _log(d, f"fastvae: no checkpoint in {out}: starting a new run")
    if isinstance(dataset, Dataset):
        data = dataset.to(dev)
    else:
        name = cfg["dataset"]
        if ckpt is not None:  # a resumed run keeps the data set it trained on ("auto" as resolved then)
            if dataset is not None and dataset not in (ckpt["dataset"], ckpt["config"]["dataset"]):
                raise ValueError(f"resume: the checkpoint was trained on {ckpt['dataset']!r}, not {dataset!r}")
            name = ckpt["dataset"]
        data = load_dataset(name, data_dir=data_dir, device=dev)
    n_train = data.train_x.shape[0]
    if cfg["batch_size"] > n_train:
        raise ValueError(f"batch_size {cfg['batch_size']} is larger than the training set "
                         f"({n_train} images of {data.name})")
    if d.world > 1 and cfg["batch_size"] < d.world:
        raise ValueError(f"batch_size {cfg['batch_size']} is the global batch and must be at least the "
                         f"number of processes ({d.world})")

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(cfg["seed"])
        model = VAE(data.input_dim, cfg["hidden_dim"], cfg["latent_dim"], backend=backend).to(dev)
    if init is not None:
        if init.input_dim != data.input_dim:
            raise ValueError(f"init takes {init.input_dim} inputs, {data.name} has {data.input_dim}")
        model.load_state_dict(init.state_dict())
    used_precision, why = choose_precision(precision, dev)
    trainer = Trainer(model, cfg, dev, d, backend, compile, amp=used_precision == "bf16",
                      cuda_graph=cuda_graph)
    history = {"train_loss": [], "test_loss": [], "epoch_seconds": []}
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        trainer.opt.load_state_dict(ckpt["optimizer"])
        trainer.load_rng_state(ckpt["rng"])
        history = {k: list(ckpt["history"][k]) for k in history}
        start_epoch = ckpt["epoch"]
        _log(d, f"fastvae: resuming {out / CHECKPOINT} after epoch {start_epoch}")

    writes = out is not None and d.main
    metrics = {
        "dataset": data.name, "dataset_source": data.source, "dataset_requested": cfg["dataset"],
        "n_train": n_train, "n_test": data.test_x.shape[0], "device": _device_name(dev),
        "world_size": d.world, "precision": used_precision, "precision_reason": why,
        "config": {**cfg, "backend": backend, "compile": compile, "precision": precision},
        "cuda_graph": trainer.graph is not None,
    }
    _log(d, f"fastvae: training a {data.input_dim}-{cfg['hidden_dim']}-{cfg['latent_dim']} VAE on "
            f"{data.name} ({n_train} train / {data.test_x.shape[0]} test images) on {metrics['device']}"
            + (f" with {d.world} processes" if d.world > 1 else "")
            + (f", objective: the IWAE bound with K={cfg['train_samples']}" if cfg["objective"] == "iwae" else ""))
    _log(d, f"fastvae: precision {used_precision} ({why})")
    if dev.type == "cuda":
        _log(d, "fastvae: each step is one CUDA graph" if trainer.graph is not None
             else f"fastvae: steps run eagerly (CUDA graph: {trainer.graph_off})")

    for epoch in range(start_epoch, cfg["epochs"]):
        t0 = time.perf_counter()
        train_sum = train_epoch(trainer, data.train_x, f"epoch {epoch + 1}/{cfg['epochs']}",
                                progress and d.main)
        train_sum = _all_sum(train_sum, d).item()  # the one host read of the epoch (syncs the device)
        seconds = time.perf_counter() - t0
        model.eval()
        test_x = data.test_x.tensor_split(d.world)[d.rank] if d.world > 1 else data.test_x
        test_sum = _all_sum(neg_elbo_sum(model, test_x, trainer.noise_gen), d).item()
        weights_ok = bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())
        if not (math.isfinite(train_sum) and math.isfinite(test_sum) and weights_ok):
            if not writes:
                kept = "nothing was written"
            elif epoch > 0:
                kept = f"{out / CHECKPOINT} still holds epoch {epoch}"
            elif clear is not None:
                kept = f"the run that was in {out} is left as it was"
            else:
                kept = "no checkpoint was written"
            raise TrainingDiverged(
                f"training diverged in epoch {epoch + 1}: train loss {train_sum / n_train:.4g}, test loss "
                f"{test_sum / data.test_x.shape[0]:.4g}"
                + ("" if weights_ok else ", non-finite weights")
                + f"; stopped, {kept}. Try a smaller learning rate (lr={cfg['lr']:g})")
        history["train_loss"].append(train_sum / n_train)
        history["test_loss"].append(test_sum / data.test_x.shape[0])
        history["epoch_seconds"].append(seconds)
        _log(d, f"epoch {epoch + 1}/{cfg['epochs']}  train loss {history['train_loss'][-1]:.2f}  "
                f"test loss {history['test_loss'][-1]:.2f}  ({seconds:.2f} s, {n_train / seconds:,.0f} images/s)")
        rng = trainer.rng_state()  # a collective under DDP: every rank takes part
        if writes:
            # replaces the old checkpoint in one rename: until then the old run is all there
            save_checkpoint(out / CHECKPOINT, {
                "model": model.state_dict(), "optimizer": trainer.opt.state_dict(),
                "model_config": model.config, "backend": backend, "config": cfg, "dataset": data.name,
                "epoch": epoch + 1, "rng": rng, "history": history,
            })
            if clear is not None:  # overwrite: the old run's figures go once the new run has a checkpoint
                clear(keep=(CHECKPOINT, METRICS))
                clear = None
            write_metrics(out / METRICS, _metrics(metrics, history, n_train))

    metrics = _metrics(metrics, history, n_train)
    if iw_samples:  # every rank takes part: the IWAE bound is sharded over the ranks
        gen = torch.Generator(device=dev).manual_seed(cfg["seed"])
        result = evaluate(model, data, iw_samples=iw_samples, generator=gen, progress=progress)
        metrics.update(iw_samples=iw_samples, iw_log_likelihood=result["iw_log_likelihood"],
                       test_elbo_eval=result["elbo"])
        _log(d, f"IWAE bound of log p(x) with K={iw_samples}: {result['iw_log_likelihood']:.2f} nats "
                f"(ELBO {result['elbo']:.2f})")
    if writes:
        if figures:
            from .figures import write_run_figures

            metrics["figures"] = write_run_figures(model, data, history, out, seed=cfg["seed"])
        write_metrics(out / METRICS, metrics)
        _log(d, f"fastvae: wrote {out / METRICS}, {out / CHECKPOINT}"
                + (f" and {len(metrics.get('figures', []))} figures" if figures else ""))
    model.eval()
    return TrainResult(model, metrics, out)


def _metrics(base: dict, history: dict, n_train: int) -> dict:
    secs = history["epoch_seconds"]
    return {
        **base, "epochs": len(history["train_loss"]), **history,
        "samples_per_second": n_train * len(secs) / sum(secs) if secs else None,
        "final_test_loss": history["test_loss"][-1] if history["test_loss"] else None,
    }
