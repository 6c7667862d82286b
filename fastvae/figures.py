"""Figures of a trained VAE, as PNG files (matplotlib, Agg backend: no display needed).

* ``reconstructions.png``: test images over their reconstructions
* ``samples.png``: decoded z ~ N(0, I)
* ``loss_curve.png``: train and test loss per epoch
* ``latent_scatter.png`` (latent_dim == 2): mu of the test images, coloured by label
* ``manifold.png`` (latent_dim == 2): the decoder over a grid of z taken through the inverse normal
  CDF, as in Fig. 4 of Kingma & Welling (2014)
* :func:`save_decoded`: chosen z, e.g. [0.5, 0] and [2, 0], decoded to an image
* :func:`compare_latents`: reconstructions at latent 20 and latent 5 side by side
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .data import Dataset  # noqa: E402
from .model import VAE, decode_latents  # noqa: E402

PathLike = Union[str, Path]


def _side(model: VAE) -> int:
    side = math.isqrt(model.input_dim)
    if side * side != model.input_dim:
        raise ValueError(f"figures need square images; input_dim {model.input_dim} is not a square")
    return side


def image_grid(images: Tensor, nrow: int, side: int, pad: int = 2) -> np.ndarray:
    """Probabilities [n, side*side] as one [H, W] array, ``nrow`` images per row, padded with white."""
    imgs = images.detach().float().cpu().reshape(-1, side, side).numpy()
    n = imgs.shape[0]
    rows = math.ceil(n / nrow)
    grid = np.ones((rows * (side + pad) + pad, nrow * (side + pad) + pad), dtype=np.float32)
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        y, x = pad + r * (side + pad), pad + c * (side + pad)
        grid[y:y + side, x:x + side] = img
    return grid


def _save_grid(grid: np.ndarray, path: PathLike, title: str, row_labels: Sequence[str] = (),
               row_height: int = 0, xticks: Sequence[tuple[float, str]] = (),
               yticks: Sequence[tuple[float, str]] = (), xlabel: str = "", ylabel: str = "",
               px: float = 4.0) -> Path:
    """``grid`` as a PNG at ``px`` screen pixels per image pixel, cropped to its content."""
    h, w = grid.shape
    fig, ax = plt.subplots(figsize=(w * px / 100, h * px / 100), dpi=100)
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([t for t, _ in xticks], [label for _, label in xticks], fontsize=8)
    if row_labels:
        yticks = [(row_height * (i + 0.5), label) for i, label in enumerate(row_labels)]
    ax.set_yticks([t for t, _ in yticks], [label for _, label in yticks], fontsize=8)
    if row_labels:
        ax.tick_params(length=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _savefig(fig, path, bbox_inches="tight", pad_inches=0.08)


def _savefig(fig, path: PathLike, **kwargs) -> Path:
    """``fig`` as a PNG at ``path``, written atomically (a full disk or a read-only folder leaves no
    part of a file: a :class:`fastvae.training.RunWriteError`), then closed."""
    from .training import _atomic_write

    try:
        _atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png", **kwargs))
    finally:
        plt.close(fig)
    return Path(path)


def spread(x: Tensor, n: int) -> Tensor:
    """``n`` images evenly spaced through ``x`` (test sets are often sorted by label)."""
    idx = torch.linspace(0, x.shape[0] - 1, min(n, x.shape[0])).round().long()
    return x[idx.to(x.device)]


@torch.no_grad()
def reconstruct(model: VAE, x: Tensor) -> Tensor:
    """Mean reconstructions (z = mu): probabilities [n, input_dim]."""
    mu, _ = model.encode(x.to(model.fc1.weight.device))
    return model.decode(mu)


@torch.no_grad()
def save_reconstructions(model: VAE, x: Tensor, path: PathLike, n: int = 10, dataset: str = "") -> Path:
    """``n`` images spread through ``x`` over their reconstructions (z = mu)."""
    x = spread(x, n)
    originals = model.prepare_input(x.to(model.fc1.weight.device))
    grid = image_grid(torch.cat([originals, reconstruct(model, x)]), nrow=x.shape[0], side=_side(model))
    on = f" of {dataset} test images" if dataset else ""
    return _save_grid(grid, path, f"reconstructions{on}, latent dim {model.latent_dim}",
                      ("original", "reconstruction"), _side(model) + 2)


@torch.no_grad()
def save_samples(model: VAE, path: PathLike, n: int = 64, seed: int = 0) -> Path:
    """``n`` images decoded from z ~ N(0, I)."""
    gen = torch.Generator(device=model.fc1.weight.device).manual_seed(seed)
    nrow = math.isqrt(n) if math.isqrt(n) ** 2 == n else 8
    grid = image_grid(model.sample(n, generator=gen), nrow=nrow, side=_side(model))
    return _save_grid(grid, path, f"samples: z ~ N(0, I), latent dim {model.latent_dim}", px=3.0)


def save_loss_curve(history: dict, path: PathLike, dataset: str = "") -> Path:
    """Train and test loss (nats per image) against the epoch (whole-epoch ticks)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    epochs = range(1, len(history["train_loss"]) + 1)
    ax.plot(epochs, history["train_loss"], "o-", label="train (objective)")
    ax.plot(epochs, history["test_loss"], "s-", label="test (negative ELBO)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(epochs) == 1:
        ax.set_xlim(0.5, 1.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per image (nats)")
    ax.set_title(f"VAE loss on {dataset}" if dataset else "VAE loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _savefig(fig, path)


def _require_2d(model: VAE, what: str) -> None:
    if model.latent_dim != 2:
        raise ValueError(f"{what} needs a model with latent_dim == 2, this one has {model.latent_dim}")


@torch.no_grad()
def save_latent_scatter(model: VAE, x: Tensor, labels: Tensor, path: PathLike,
                        class_names: Optional[Sequence[str]] = None) -> Path:
    """mu of each image in the 2-D latent space, coloured by its label (named by ``class_names``)."""
    _require_2d(model, "latent_scatter")
    mu, _ = model.encode(x.to(model.fc1.weight.device))
    mu, labels = mu.float().cpu().numpy(), labels.cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    sc = ax.scatter(mu[:, 0], mu[:, 1], c=labels, cmap="tab10", s=4, alpha=0.7, vmin=-0.5, vmax=9.5)
    bar = fig.colorbar(sc, ax=ax, ticks=range(10), label="label")
    if class_names:
        bar.set_ticklabels(list(class_names))
    ax.set_xlabel("$\\mu_1$")
    ax.set_ylabel("$\\mu_2$")
    ax.set_title("test images in latent space")
    fig.tight_layout()
    return _savefig(fig, path)


@torch.no_grad()
def manifold_latents(n: int = 20) -> Tensor:
    """[n*n, 2] z on a grid of probabilities mapped through the inverse normal CDF (rows: z2 falling)."""
    p = torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=torch.float64)
    q = torch.special.ndtri(p)
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], 1)


@torch.no_grad()
def save_manifold(model: VAE, path: PathLike, n: int = 20) -> Path:
    """The learned data manifold: decoded z over an ``n`` x ``n`` inverse-normal-CDF grid, with
    the z values on the axes."""
    _require_2d(model, "manifold")
    side = _side(model)
    z = manifold_latents(n)
    grid = image_grid(decode_latents(model, z), nrow=n, side=side, pad=0)
    q = z[:n, 0].tolist()  # z1 along a row; z2 falls down the rows (the same values, reversed)
    every = max(1, n // 7)
    picks = sorted({*range(0, n // 2, every), *(n - 1 - i for i in range(0, n // 2, every))})  # symmetric
    xticks = [(side * (i + 0.5) - 0.5, f"{q[i]:.2f}") for i in picks]
    yticks = [(side * (i + 0.5) - 0.5, f"{q[n - 1 - i]:.2f}") for i in picks]
    return _save_grid(grid, path, "learned manifold: z = Φ⁻¹(grid) (Kingma & Welling, Fig. 4)",
                      xticks=xticks, yticks=yticks, xlabel="$z_1$", ylabel="$z_2$", px=2.0)


@torch.no_grad()
def save_decoded(model: VAE, z: Union[Tensor, Sequence[Sequence[float]]], path: PathLike) -> Path:
    """Decode chosen latent points (e.g. ``[[0.5, 0], [2, 0]]``) into one image, labelled by z."""
    zt = torch.as_tensor(z, dtype=torch.float64)
    zt = zt.unsqueeze(0) if zt.dim() == 1 else zt
    images = decode_latents(model, zt)
    side = _side(model)
    fig, axes = plt.subplots(1, len(images), figsize=(1.6 * len(images), 2.0), dpi=100, squeeze=False)
    for ax, img, zi in zip(axes[0], images, zt):
        ax.imshow(img.float().cpu().reshape(side, side).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title("z = [" + ", ".join(f"{v:g}" for v in zi.tolist()) + "]", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return _savefig(fig, path)


def write_run_figures(model: VAE, data: Dataset, history: dict, out_dir: PathLike, seed: int = 0) -> list[str]:
    """All of a run's figures into ``out_dir``; returns their file names."""
    out = Path(out_dir)
    model.eval()
    paths = [save_reconstructions(model, data.test_x, out / "reconstructions.png", dataset=data.name),
             save_samples(model, out / "samples.png", seed=seed),
             save_loss_curve(history, out / "loss_curve.png", dataset=data.name)]
    if model.latent_dim == 2:
        from torchvision.datasets import FashionMNIST

        names = FashionMNIST.classes if data.name == "fashion-mnist" else None
        paths += [save_latent_scatter(model, data.test_x, data.test_y, out / "latent_scatter.png", names),
                  save_manifold(model, out / "manifold.png")]
    return [p.name for p in paths]


def compare_latents(dataset: Union[str, Dataset] = "auto", latent_dims: Sequence[int] = (20, 5),
                    out_dir: PathLike = "runs/latent-comparison", n: int = 8,
                    **train_kwargs) -> Path:
    """The classic comparison: train one VAE per latent size, then plot test images over their
    reconstructions at each size (latent 20 keeps more detail than latent 5).

    ``train_kwargs`` go to :func:`fastvae.train` (epochs, device, ...). Each model's run is kept in
    ``out_dir/latent-<L>``; the figure is ``out_dir/latent_comparison.png``.
    """
    from .data import load_dataset
    from .training import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, data_dir=train_kwargs.pop("data_dir", None))
    x = spread(data.test_x, n)
    rows, labels, losses = [], ["original"], []
    for latent in latent_dims:
        result = train(data, latent_dim=latent, out_dir=out / f"latent-{latent}", **train_kwargs)
        model = result.model
        if not rows:
            rows.append(model.prepare_input(x.to(model.fc1.weight.device)))
        rows.append(reconstruct(model, x))
        labels.append(f"latent {latent}")
        losses.append(f"latent {latent}: {result.metrics['final_test_loss']:.1f}")
    side = _side(model)
    grid = image_grid(torch.cat([r.cpu() for r in rows]), nrow=n, side=side)
    return _save_grid(grid, out / "latent_comparison.png",
                      f"reconstructions on {data.name} (test loss, nats: {'; '.join(losses)})", labels, side + 2)
