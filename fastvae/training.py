"""``fastvae.train()``: the classic VAE end to end, fast.

The hot loop keeps the whole data set on the training device as uint8, draws batches from a
per-epoch permutation (no DataLoader, no per-sample Python work), trains on logits with the fused
loss, steps a fused Adam, and accumulates the loss on the device: the host reads it once per epoch.

Reproducibility: the model is initialised from ``seed``; two dedicated generators (one for the
permutations, one for the reparameterisation noise) are saved in every checkpoint, so a resumed
run on CPU reproduces the weights of an uninterrupted one exactly.

Multi-process: under ``torchrun`` (``WORLD_SIZE`` > 1) training runs with DDP (NCCL on GPU, gloo
on CPU). ``batch_size`` is the global batch: every rank draws the same permutation and takes its
slice of each batch, so the run follows the single-process math. Only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ._backend import check_backend, hardware_name
from .data import DATASETS, Dataset, load_dataset
from .evaluate import evaluate, neg_elbo_sum
from .model import VAE, check_positive_int
from .modules import FusedELBO

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
# Hyperparameters: an explicit argument wins, else a resumed checkpoint's value, else this default.
DEFAULTS: dict[str, Any] = {
    "dataset": "auto", "epochs": 10, "latent_dim": 20, "hidden_dim": 400, "batch_size": 128,
    "lr": 1e-3, "beta": 1.0, "seed": 1,
}
# keys that must not change when a run is resumed (epochs may grow)
_FIXED_ON_RESUME = ("latent_dim", "hidden_dim", "batch_size", "lr", "beta", "seed")


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
def _atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temp file beside ``path``, then rename over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Union[str, Path], state: dict) -> None:
    """``torch.save`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    _atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def write_metrics(path: Union[str, Path], metrics: dict) -> None:
    _atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> tuple[VAE, dict]:
    """Load ``checkpoint.pt`` (or a run folder holding one): the model and the checkpoint dict."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first (python -m fastvae train --out ...)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        model = VAE(**ckpt["model_config"], backend=ckpt.get("backend", "auto"))
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        raise ValueError(f"{path} is not a readable fastvae checkpoint ({e}); delete it or train again") from e
    return model.to(map_location), ckpt


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return hardware_name(device)
    return f"cpu ({hardware_name(device)}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- the loop
class Trainer:
    """One process's training state: model, optimizer, generators, the compiled or eager step.

    ``cfg`` needs ``batch_size``, ``lr``, ``beta`` and ``seed``. :func:`train` drives it; use it
    directly (with :func:`train_epoch`) to run fastvae's epoch loop inside your own code.
    """

    def __init__(self, model: VAE, cfg: dict, device: torch.device, d: Optional[_Dist] = None,
                 backend: str = "auto", compile: bool = False, amp: bool = False):
        d = d or _Dist()
        self.model, self.cfg, self.device, self.d = model, cfg, device, d
        self.loss_fn = FusedELBO(reduction="sum", beta=cfg["beta"], backend=backend)
        adam_kw = {"fused": True} if device.type in ("cuda", "cpu") else {}
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], **adam_kw)
        # same permutation on every rank; distinct reparameterisation noise per rank
        self.perm_gen = torch.Generator(device=device).manual_seed(cfg["seed"])
        self.noise_gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 1 + d.rank)
        self.net = model
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if amp
                         else contextlib.nullcontext())
        self.forward_loss = self._forward_loss
        self.compiled = compile
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPU
            self.forward_loss = torch.compile(self._forward_loss, mode=mode)

    def _forward_loss(self, xb: Tensor, eps: Optional[Tensor] = None) -> Tensor:
        xf = self.model.prepare_input(xb)  # uint8 -> float once, shared by the encoder and the loss
        # the Triton loss reads uint8 targets itself (4x fewer bytes); the CPU fallback takes xf
        target = xb if self.device.type == "cuda" else xf
        with self.autocast:
            if eps is None:
                logits, mu, logvar = self.net(xf, generator=self.noise_gen)
            else:
                logits, mu, logvar = self.net(xf, eps=eps)
            return self.loss_fn(logits, target, mu, logvar)

    def step(self, xb: Tensor) -> Tensor:
        eps = None
        if self.compiled:
            # torch.compile cannot take a torch.Generator into its graph: the step's noise is drawn
            # from the run's generator outside it, so the forward and loss stay one graph
            eps = torch.randn((xb.shape[0], self.model.latent_dim), generator=self.noise_gen,
                              device=self.device)
        loss = self.forward_loss(xb, eps)
        # DDP averages gradients over ranks; scaling by the world size makes them the gradient
        # of the summed loss over the global batch, as in one process
        (loss * self.d.world if self.d.world > 1 else loss).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

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


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not enabled, unit="batch",
                dynamic_ncols=True, file=sys.stderr)


def train_epoch(trainer: Trainer, x: Tensor, desc: str = "train", progress: bool = False) -> Tensor:
    """One epoch over ``x`` (uint8 or float images on the device): the summed loss, on the device."""
    trainer.model.train()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    batches = trainer.batches(x.shape[0])
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
          amp: bool = False, resume: bool = False, iw_samples: int = 0,
          data_dir: Union[str, Path, None] = None, figures: bool = True,
          progress: bool = True, init: Optional[VAE] = None) -> TrainResult:
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
        out_dir: where metrics.json, checkpoint.pt and the figures go; None writes nothing.
        backend: fastvae's op backend ("auto", "triton", "torch").
        compile: ``torch.compile`` the forward and loss (CUDA graphs on GPU).
        amp: bf16 autocast (meant for GPU; the fused loss accumulates in fp32).
        resume: continue from ``out_dir/checkpoint.pt`` if there is one.
        iw_samples: K > 0 also computes the IWAE bound of log p(x) on the test set at the end.
        data_dir: where the IDX files are, or go when downloaded.
        figures: write the PNG figures; progress: show tqdm bars.
        init: start from this model's weights (copied; its sizes set latent_dim and hidden_dim)
            instead of a fresh initialisation from ``seed``.

    Returns:
        :class:`TrainResult` with the model, the metrics (as in metrics.json) and out_dir.

    Raises:
        ValueError for bad arguments (unknown dataset, latent_dim < 1, batch_size larger than the
        training set, a device that is not present, ...).
    """
    explicit = {"dataset": dataset if not isinstance(dataset, Dataset) else None, "epochs": epochs,
                "latent_dim": latent_dim, "hidden_dim": hidden_dim, "batch_size": batch_size, "lr": lr,
                "beta": beta, "seed": seed}
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
    ckpt = None
    if resume and (out / CHECKPOINT).is_file():
        ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        changed = {k: (ckpt["config"][k], explicit[k]) for k in _FIXED_ON_RESUME
                   if k in explicit and explicit[k] != ckpt["config"][k]}
        if changed:
            raise ValueError("resume: these settings differ from the checkpoint's (saved, given): "
                             + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in changed.items()))
    # resuming without epochs= continues to the checkpoint's own target (an interrupted run ends
    # where it was meant to); epochs= extends or sets it
    cfg = {**DEFAULTS, **(ckpt["config"] if ckpt else {}), **explicit}
    if isinstance(dataset, Dataset):
        cfg["dataset"] = dataset.name
    _check_args(cfg, backend, iw_samples, check_name=not isinstance(dataset, Dataset))

    d, dev = _init_distributed(device)
    try:
        return _train(cfg, dataset, dev, d, out, ckpt, backend, compile, amp, resume, iw_samples,
                      data_dir, figures, progress, init)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(cfg, dataset, dev, d, out, ckpt, backend, compile, amp, resume, iw_samples, data_dir,
           figures, progress, init) -> TrainResult:
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
    trainer = Trainer(model, cfg, dev, d, backend, compile, amp)
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
    if writes:
        out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "dataset": data.name, "dataset_source": data.source, "dataset_requested": cfg["dataset"],
        "n_train": n_train, "n_test": data.test_x.shape[0], "device": _device_name(dev),
        "world_size": d.world, "config": {**cfg, "backend": backend, "compile": compile, "amp": amp},
    }
    _log(d, f"fastvae: training a {data.input_dim}-{cfg['hidden_dim']}-{cfg['latent_dim']} VAE on "
            f"{data.name} ({n_train} train / {data.test_x.shape[0]} test images) on {metrics['device']}"
            + (f" with {d.world} processes" if d.world > 1 else ""))

    for epoch in range(start_epoch, cfg["epochs"]):
        t0 = time.perf_counter()
        train_sum = train_epoch(trainer, data.train_x, f"epoch {epoch + 1}/{cfg['epochs']}",
                                progress and d.main)
        train_sum = _all_sum(train_sum, d).item()  # the one host read of the epoch (syncs the device)
        seconds = time.perf_counter() - t0
        model.eval()
        test_x = data.test_x.tensor_split(d.world)[d.rank] if d.world > 1 else data.test_x
        test_sum = _all_sum(neg_elbo_sum(model, test_x, trainer.noise_gen), d).item()
        history["train_loss"].append(train_sum / n_train)
        history["test_loss"].append(test_sum / data.test_x.shape[0])
        history["epoch_seconds"].append(seconds)
        _log(d, f"epoch {epoch + 1}/{cfg['epochs']}  train loss {history['train_loss'][-1]:.2f}  "
                f"test loss {history['test_loss'][-1]:.2f}  ({seconds:.2f} s, {n_train / seconds:,.0f} images/s)")
        rng = trainer.rng_state()  # a collective under DDP: every rank takes part
        if writes:
            save_checkpoint(out / CHECKPOINT, {
                "model": model.state_dict(), "optimizer": trainer.opt.state_dict(),
                "model_config": model.config, "backend": backend, "config": cfg, "dataset": data.name,
                "epoch": epoch + 1, "rng": rng, "history": history,
            })
            write_metrics(out / METRICS, _metrics(metrics, history, n_train))

    metrics = _metrics(metrics, history, n_train)
    if iw_samples and d.main:
        gen = torch.Generator(device=dev).manual_seed(cfg["seed"])
        result = evaluate(model, data, iw_samples=iw_samples, generator=gen)
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
