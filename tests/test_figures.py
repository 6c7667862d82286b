"""Figures read well: the manifold's axes carry z values, the loss curve whole epochs and the data
set's name, reconstructions are drawn large."""
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import fastvae
from fastvae import figures


@pytest.fixture
def captured(monkeypatch):
    """The matplotlib figures the functions draw, kept open for inspection."""
    figs, close = [], figures.plt.close
    monkeypatch.setattr(figures.plt, "close", figs.append)
    yield figs
    for fig in figs:
        close(fig)


def _model(latent=2):
    torch.manual_seed(0)
    return fastvae.VAE(784, 32, latent)


def test_manifold_axes_show_z_values(tmp_path, captured):
    figures.save_manifold(_model(), tmp_path / "m.png", n=20)
    ax = captured[-1].axes[0]
    xlabels = [t.get_text() for t in ax.get_xticklabels()]
    ylabels = [t.get_text() for t in ax.get_yticklabels()]
    q = torch.special.ndtri(torch.linspace(0.5 / 20, 1 - 0.5 / 20, 20, dtype=torch.float64))
    assert xlabels[0] == f"{q[0]:.2f}" == "-1.96" and xlabels[-1] == "1.96"
    assert ylabels[0] == "1.96" and ylabels[-1] == "-1.96"  # z2 falls down the rows
    # every tick sits at the centre of the image decoded at that z value
    for pos, label in zip(ax.get_xticks(), xlabels):
        col = round((pos + 0.5) / 28 - 0.5)
        assert label == f"{q[col]:.2f}"
    assert ax.get_xlabel() == "$z_1$" and ax.get_ylabel() == "$z_2$"


def test_loss_curve_has_whole_epochs_and_names_the_data_set(tmp_path, captured):
    history = {"train_loss": [200.0, 180.0], "test_loss": [190.0, 175.0]}
    figures.save_loss_curve(history, tmp_path / "l.png", dataset="fashion-mnist")
    ax = captured[-1].axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert "fashion-mnist" in ax.get_title()


def test_reconstructions_are_large_and_cropped(tmp_path):
    x = torch.randint(0, 256, (50, 784), dtype=torch.uint8)
    path = figures.save_reconstructions(_model(20), x, tmp_path / "r.png", dataset="mnist")
    img = mpimg.imread(path)[..., :3]
    assert img.shape[1] >= 10 * 28 * 3  # at least 3 screen pixels per image pixel
    # no empty strip: the outermost 5% of columns and rows are not all background
    white = np.all(img > 0.99, axis=2)
    band_w, band_h = img.shape[1] // 20, img.shape[0] // 20
    for strip in (white[:, :band_w], white[:, -band_w:], white[:band_h], white[-band_h:]):
        assert not strip.all()
