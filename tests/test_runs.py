"""A run's folder and checkpoint can be trusted: nothing is overwritten by accident, concurrent runs
are refused, divergence stops the run, bad folders and checkpoints fail before any work starts,
and checkpoints are written atomically and verified when read."""
import errno
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fastvae
import fastvae.training as training
from fastvae.__main__ import main
from fastvae.training import (LOCK, RunFolder, RunWriteError, Trainer, TrainingDiverged,
                              choose_precision, read_checkpoint, save_checkpoint)

QUIET = dict(progress=False, device="cpu", batch_size=64)


@pytest.fixture(scope="module")
def tiny():
    return fastvae.load_dataset("mnist-5k").subset(256, 64)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_data(*args, **kwargs):
    raise AssertionError("the data set was loaded before the error was found")


# ----------------------------------------------------------------------------- overwriting
def test_existing_run_is_not_overwritten_without_resume_or_overwrite(tiny, tmp_path):
    fastvae.train(tiny, epochs=1, latent_dim=2, out_dir=tmp_path, **QUIET)
    before = {p.name: _sha(p) for p in tmp_path.iterdir() if p.name != LOCK}
    assert {"checkpoint.pt", "metrics.json", "manifold.png"} <= set(before)
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        fastvae.train(tiny, epochs=1, out_dir=tmp_path, **QUIET)
    assert {p.name: _sha(p) for p in tmp_path.iterdir() if p.name != LOCK} == before


def test_overwrite_replaces_the_whole_run_and_leaves_no_stale_figures(tiny, tmp_path):
    fastvae.train(tiny, epochs=1, latent_dim=2, out_dir=tmp_path, **QUIET)
    assert (tmp_path / "manifold.png").exists()
    fastvae.train(tiny, epochs=1, latent_dim=3, out_dir=tmp_path, overwrite=True, **QUIET)
    assert read_checkpoint(tmp_path)["config"]["latent_dim"] == 3
    assert not (tmp_path / "manifold.png").exists() and not (tmp_path / "latent_scatter.png").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["latent_dim"] == 3


def test_resume_without_a_checkpoint_does_not_overwrite_other_outputs(tiny, tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="but no checkpoint to resume; pass --overwrite") as exc:
        fastvae.train(tiny, epochs=1, out_dir=tmp_path, resume=True, **QUIET)
    assert "pass --resume" not in str(exc.value)
    assert (tmp_path / "metrics.json").read_text() == "{}"


# ----------------------------------------------------------------------------- concurrency
def test_a_folder_in_use_is_refused(tiny, tmp_path):
    with RunFolder(tmp_path):
        with pytest.raises(ValueError, match=f"in use by another fastvae run \\(process {os.getpid()}\\)"):
            fastvae.train(tiny, epochs=1, out_dir=tmp_path, **QUIET)
    assert not (tmp_path / "checkpoint.pt").exists()
    fastvae.train(tiny, epochs=1, out_dir=tmp_path, figures=False, **QUIET)  # released: it runs


def test_lock_of_a_killed_holder_is_released(tiny, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"f = open({str(tmp_path / LOCK)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('4242')\n"
         "f.flush(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="in use by another fastvae run \\(process 4242\\)"):
            fastvae.train(tiny, epochs=1, out_dir=tmp_path, **QUIET)
    finally:
        holder.kill()  # kill -9: no chance to clean up
        holder.wait()
    fastvae.train(tiny, epochs=1, out_dir=tmp_path, figures=False, **QUIET)
    assert read_checkpoint(tmp_path)["epoch"] == 1


def test_stale_temp_files_of_interrupted_writes_are_removed(tiny, tmp_path):
    stale = [tmp_path / ".checkpoint.pt.99999.tmp", tmp_path / ".metrics.json.99998.tmp"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    fastvae.train(tiny, epochs=1, out_dir=tmp_path, figures=False, **QUIET)
    assert not any(p.exists() for p in stale)
    assert not list(tmp_path.glob(".*tmp"))


# ----------------------------------------------------------------------------- divergence
def test_divergence_stops_a_new_run_and_writes_nothing(tiny, tmp_path):
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1: train loss nan.*smaller learning rate"):
        fastvae.train(tiny, epochs=3, lr=10.0, out_dir=tmp_path, **QUIET)
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "metrics.json").exists()


def test_divergence_never_replaces_a_good_checkpoint(tiny, tmp_path):
    fastvae.train(tiny, epochs=1, out_dir=tmp_path, figures=False, **QUIET)
    # the next epoch runs at a learning rate that blows it up
    ckpt = read_checkpoint(tmp_path)
    for group in ckpt["optimizer"]["param_groups"]:
        group["lr"] = 1e4
    save_checkpoint(tmp_path / "checkpoint.pt", ckpt)
    good = {name: _sha(tmp_path / name) for name in ("checkpoint.pt", "metrics.json")}
    with pytest.raises(TrainingDiverged, match="epoch 2.*checkpoint.pt still holds epoch 1"):
        fastvae.train(tiny, epochs=3, out_dir=tmp_path, resume=True, **QUIET)
    assert {name: _sha(tmp_path / name) for name in good} == good


def test_a_diverging_overwrite_keeps_the_old_run(tiny, tmp_path):
    fastvae.train(tiny, epochs=1, out_dir=tmp_path, **QUIET)
    before = {p.name: _sha(p) for p in tmp_path.iterdir() if p.name != LOCK}
    with pytest.raises(TrainingDiverged, match="left as it was"):
        fastvae.train(tiny, epochs=1, lr=10.0, out_dir=tmp_path, overwrite=True, **QUIET)
    assert {p.name: _sha(p) for p in tmp_path.iterdir() if p.name != LOCK} == before


def test_metrics_json_is_strict_json(tmp_path):
    training.write_metrics(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2.5})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) == \
        {"a": None, "b": [1.0, None], "c": 2.5}


# ----------------------------------------------------------------------------- checks before work
def test_out_that_is_a_file_fails_before_loading_data(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "load_dataset", _no_data)
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(ValueError, match=f"output folder {f} is a file"):
        fastvae.train("mnist-5k", out_dir=f, **QUIET)
    assert f.read_text() == "mine"


def _read_only_dir(tmp_path):
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    if os.path.isdir("/sys/kernel"):
        return "/sys/kernel"  # root writes past chmod; sysfs refuses new files even to root
    pytest.skip("no read-only folder available")


def test_read_only_out_fails_before_loading_data(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "load_dataset", _no_data)
    ro = _read_only_dir(tmp_path)
    with pytest.raises(ValueError, match=f"cannot write to output folder {ro}"):
        fastvae.train("mnist-5k", out_dir=ro, **QUIET)


def test_truncated_checkpoint_on_resume_is_a_clear_error(tiny, tmp_path, monkeypatch):
    fastvae.train(tiny, epochs=1, out_dir=tmp_path, figures=False, **QUIET)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    monkeypatch.setattr(training, "load_dataset", _no_data)
    with pytest.raises(ValueError, match="checkpoint.pt is not a usable fastvae checkpoint: it cannot be read"):
        fastvae.train("mnist-5k", epochs=2, out_dir=tmp_path, resume=True, **QUIET)


def test_triton_backend_on_cpu_fails_before_loading_data(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "load_dataset", _no_data)
    monkeypatch.setattr(training, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(training, "triton_available", lambda: True)
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA GPUs, not on cpu"):
        fastvae.train("mnist-5k", backend="triton", out_dir=tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists(), "an empty run folder was left"


# ----------------------------------------------------------------------------- checkpoints
def test_bit_flipped_checkpoint_is_refused(tiny, tmp_path):
    fastvae.train(tiny, epochs=1, out_dir=tmp_path, figures=False, **QUIET)
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    # flip one bit inside fc1.weight's stored bytes (found by its value), not in the zip metadata
    w = read_checkpoint(path)["model"]["fc1.weight"]
    needle = w.reshape(-1)[100:104].numpy().tobytes()
    at = bytes(data).index(needle)
    data[at + 1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the SHA-256"):
        fastvae.load_checkpoint(tmp_path)


def test_checkpoint_with_non_finite_weights_is_refused(tiny, tmp_path):
    fastvae.train(tiny, epochs=1, out_dir=tmp_path, figures=False, **QUIET)
    ckpt = read_checkpoint(tmp_path)
    ckpt["model"]["fc4.bias"][3] = float("nan")
    save_checkpoint(tmp_path / "checkpoint.pt", ckpt)  # a valid hash over bad weights
    with pytest.raises(ValueError, match="non-finite weights in fc4.bias"):
        fastvae.load_checkpoint(tmp_path)


def test_failed_checkpoint_write_leaves_the_previous_one_loadable(tiny, tmp_path, monkeypatch):
    fastvae.train(tiny, epochs=1, out_dir=tmp_path, figures=False, **QUIET)
    before = _sha(tmp_path / "checkpoint.pt")
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half the file written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(RunWriteError, match=f"cannot write checkpoint.pt in {tmp_path}: no space left"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"model": {}, "model_config": {}})
    monkeypatch.undo()
    assert _sha(tmp_path / "checkpoint.pt") == before
    assert read_checkpoint(tmp_path)["epoch"] == 1
    assert not list(tmp_path.glob(".*tmp"))


def test_torch_save_into_a_file_object_reports_a_full_disk_as_enospc():
    # why _atomic_write hands torch.save a file object: given a path, torch.save's writer turns
    # ENOSPC into RuntimeError("unexpected pos"); /dev/full fails every write with ENOSPC
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OSError) as exc:
        with open("/dev/full", "wb") as fh:
            torch.save({"w": torch.zeros(100000)}, fh)
    assert exc.value.errno == errno.ENOSPC


class _FullDisk:
    """``open`` for fastvae.training whose files named ``name`` take ``room`` bytes, then raise ENOSPC."""

    def __init__(self, name, room):
        self.name, self.room = name, room

    def __call__(self, path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)
        return _Filling(fh, self.room) if self.name in os.path.basename(path) and mode != "r" else fh


class _Filling:
    def __init__(self, fh, room):
        self._fh, self._left = fh, room

    def write(self, data):
        if len(data) > self._left:
            self._fh.write(bytes(data[: self._left]) if isinstance(data, (bytes, bytearray, memoryview))
                           else data[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.json", "reconstructions.png", LOCK])
def test_a_full_disk_is_one_line_nothing_half_written_and_the_run_resumes(name, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--dataset", "mnist-5k", "--hidden-dim", "32", "--batch-size", "500", "--out", str(out),
              "--device", "cpu", "--no-progress"]
    assert main(["train", *common, "--epochs", "1", "--no-figures"]) == 0
    before = {p.name: _sha(p) for p in out.iterdir() if p.name != LOCK}
    capsys.readouterr()
    monkeypatch.setattr(training, "open", _FullDisk(name, room=0 if name == LOCK else 100), raising=False)
    code = main(["train", *common, "--epochs", "2", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == (2 if name == LOCK else 4), err
    assert err[-1].startswith("fastvae train: error: cannot write") and "Traceback" not in "".join(err)
    assert f"{out}" in err[-1] and "no space left" in err[-1], err[-1]
    assert not list(out.glob(".*tmp")), "a half-written temp file was left"
    after = {p.name: _sha(p) for p in out.iterdir() if p.name != LOCK}
    if name in ("checkpoint.pt", LOCK):  # nothing replaced
        assert after == before
    else:  # the epoch-2 checkpoint is complete; the file that failed is the old one or absent
        assert read_checkpoint(out)["epoch"] == 2
        assert after.get(name) == before.get(name)
    monkeypatch.undo()  # space freed: the run resumes and finishes
    assert main(["train", *common, "--epochs", "2", "--resume"]) == 0
    assert read_checkpoint(out)["epoch"] == 2 and (out / "reconstructions.png").exists()


def test_overwrite_killed_before_the_first_new_checkpoint_keeps_the_old_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--dataset", "mnist-5k", "--hidden-dim", "32", "--batch-size", "500", "--out", str(out),
              "--device", "cpu", "--no-progress"]
    assert main(["train", *common, "--epochs", "1", "--latent-dim", "2"]) == 0
    before = {p.name: _sha(p) for p in out.iterdir() if p.name != LOCK}
    assert {"checkpoint.pt", "metrics.json", "manifold.png"} <= set(before)

    class Killed(BaseException):
        pass

    real_save = torch.save

    def killed_mid_write(obj, f, *args, **kwargs):  # the process dies inside the first new checkpoint
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 3)
        raise Killed

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(Killed):
        main(["train", *common, "--epochs", "3", "--latent-dim", "3", "--overwrite"])
    monkeypatch.undo()
    assert {p.name: _sha(p) for p in out.iterdir() if p.name != LOCK and not p.name.endswith(".tmp")} == before
    # the old run is whole: --resume continues it (latent 2, epoch 1 -> 2)
    assert main(["train", "--out", str(out), "--epochs", "2", "--resume", "--device", "cpu",
                 "--no-progress", "--no-figures"]) == 0
    ckpt = read_checkpoint(out)
    assert ckpt["epoch"] == 2 and ckpt["config"]["latent_dim"] == 2


def test_resume_to_fewer_epochs_than_trained_says_so(tiny, tmp_path, monkeypatch):
    fastvae.train(tiny, epochs=2, out_dir=tmp_path, figures=False, **QUIET)
    before = _sha(tmp_path / "checkpoint.pt")
    monkeypatch.setattr(training, "load_dataset", _no_data)
    with pytest.raises(ValueError, match="has already trained 2 epochs, more than epochs=1"):
        fastvae.train("mnist-5k", epochs=1, out_dir=tmp_path, resume=True, **QUIET)
    assert _sha(tmp_path / "checkpoint.pt") == before


def test_checkpoint_without_a_sha256_loads_with_a_warning(tiny, tmp_path):
    fastvae.train(tiny, epochs=1, out_dir=tmp_path, figures=False, **QUIET)
    ckpt = read_checkpoint(tmp_path)
    torch.save(ckpt, tmp_path / "old.pt")  # as fastvae wrote it before the hash
    with pytest.warns(UserWarning, match="old.pt carries no SHA-256.*loaded unverified"):
        assert read_checkpoint(tmp_path / "old.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- batches, precision
def test_each_epoch_draws_a_new_permutation(tiny):
    trainer = Trainer(fastvae.VAE(), {"batch_size": 64, "lr": 1e-3, "beta": 1.0, "seed": 1},
                      torch.device("cpu"))
    n = tiny.train_x.shape[0]
    epochs = [torch.cat(trainer.batches(n)) for _ in range(3)]
    for perm in epochs:
        assert torch.equal(perm.sort().values, torch.arange(n))  # every image once
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert not torch.equal(epochs[0], torch.arange(n))


def test_precision_auto_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert choose_precision("auto", cpu)[0] == "bf16"
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    used, why = choose_precision("auto", cpu)
    assert used == "fp32" and "no native bf16" in why
    assert choose_precision("bf16", cpu) == ("bf16", "requested")
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("fp8", cpu)


def test_precision_is_logged_and_recorded(tiny, monkeypatch, capsys):
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    m = fastvae.train(tiny, epochs=1, out_dir=None, **QUIET).metrics
    assert m["precision"] == "bf16" and "native bf16" in m["precision_reason"]
    assert "precision bf16 (auto: this CPU has native bf16" in capsys.readouterr().err
    fp32 = fastvae.train(tiny, epochs=1, out_dir=None, precision="fp32", **QUIET).metrics
    assert fp32["precision"] == "fp32"
    # bf16 autocast really ran: the same run in fp32 computes a different loss
    assert m["train_loss"] != fp32["train_loss"]
    assert m["train_loss"][0] == pytest.approx(fp32["train_loss"][0], rel=0.02)


def test_non_finite_weights_under_a_finite_loss_stop_the_run_before_a_checkpoint(tiny, tmp_path, monkeypatch):
    # a bias of -inf on a pixel that is 0 in every image keeps the loss finite (its limit is 0)
    # while the weights are not: only the final weights check can stop this run
    assert (tiny.train_x.reshape(tiny.train_x.shape[0], -1)[:, 0] == 0).all()
    real_step = Trainer.optimizer_step

    def step_then_break(self):
        real_step(self)
        with torch.no_grad():
            self.model.fc4.bias[0] = -math.inf

    monkeypatch.setattr(Trainer, "optimizer_step", step_then_break)
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch 1: train loss [0-9.]+, test loss "
                                               r"[0-9.]+, non-finite weights; stopped, no checkpoint"):
        fastvae.train(tiny, epochs=1, out_dir=tmp_path, figures=False, **QUIET)
    assert not (tmp_path / "checkpoint.pt").exists()
