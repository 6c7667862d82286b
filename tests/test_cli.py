"""The command line: python -m fastvae train / evaluate / decode, and its error messages."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastvae.__main__ import main


def test_python_m_fastvae_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastvae", "train", "--dataset", "mnist-5k", "--epochs", "1",
           "--latent-dim", "4", "--hidden-dim", "64", "--batch-size", "100", "--lr", "2e-3", "--beta", "1",
           "--seed", "3", "--device", "cpu", "--out", str(out), "--iw-samples", "8", "--no-progress"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "final test loss" in proc.stdout
    assert "epoch 1/1" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    expected = {"latent_dim": 4, "hidden_dim": 64, "batch_size": 100, "lr": 2e-3, "beta": 1.0, "seed": 3}
    assert {k: metrics["config"][k] for k in expected} == expected
    assert metrics["dataset"] == "mnist-5k" and metrics["iw_samples"] == 8
    assert (out / "reconstructions.png").exists() and not (out / "manifold.png").exists()

    # resume to a second epoch, in-process
    assert main(["train", "--out", str(out), "--epochs", "2", "--resume", "--device", "cpu", "--no-progress",
                 "--no-figures"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["config"]["lr"] == 2e-3  # kept from the checkpoint

    assert main(["decode", str(out), "--z", "0.5,0,0,0", "--z", "2,0,0,0", "--out", str(tmp_path / "z.png")]) == 0
    assert (tmp_path / "z.png").stat().st_size > 1000


def test_evaluate_command(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist-5k", "--epochs", "1", "--out", str(out), "--device", "cpu",
                 "--no-progress", "--no-figures"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--iw-samples", "10", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "mnist-5k" and result["iw_samples"] == 10 and result["n"] == 1000
    assert result["iw_log_likelihood"] > result["elbo"]


@pytest.mark.parametrize("args, message", [
    (["--latent-dim", "0"], "latent_dim must be an integer >= 1"),
    (["--batch-size", "4001"], "batch_size 4001 is larger than the training set"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "device 'cuda"),
    (["--lr", "0"], "lr must be a positive number"),
])
def test_bad_arguments_exit_nonzero_with_message(args, message, tmp_path, capsys):
    code = main(["train", "--dataset", "mnist-5k", "--out", str(tmp_path), "--no-progress", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert "fastvae train: error:" in err and message in err


def test_unknown_dataset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "imagenet"])
    assert exc.value.code == 2
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err


def test_missing_checkpoint_is_reported(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_bad_latent_point(capsys):
    with pytest.raises(SystemExit):
        main(["decode", "x", "--z", "a,b"])
    assert "comma-separated numbers" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors before any work
def _no_data(*args, **kwargs):
    raise AssertionError("the data set was loaded before the error was found")


def _one_line_error(capsys, message):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvae train: error:"), err
    assert message in lines[0], err


def _small_run(out):
    assert main(["train", "--dataset", "mnist-5k", "--epochs", "1", "--hidden-dim", "32", "--out", str(out),
                 "--device", "cpu", "--no-progress", "--no-figures"]) == 0


def test_out_that_is_a_file_is_exit_2_before_any_work(tmp_path, capsys, monkeypatch):
    import fastvae.training

    monkeypatch.setattr(fastvae.training, "load_dataset", _no_data)
    (tmp_path / "f").write_text("x")
    assert main(["train", "--out", str(tmp_path / "f"), "--device", "cpu", "--no-progress"]) == 2
    _one_line_error(capsys, "is a file, not a folder")


def test_triton_on_cpu_is_exit_2_before_any_work(tmp_path, capsys, monkeypatch):
    import fastvae.training

    monkeypatch.setattr(fastvae.training, "load_dataset", _no_data)
    monkeypatch.setattr(fastvae.training, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(fastvae.training, "triton_available", lambda: True)
    assert main(["train", "--backend", "triton", "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "backend 'triton' runs on CUDA GPUs")
    assert not (tmp_path / "r").exists()


def test_existing_run_and_truncated_resume_are_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    _small_run(out)
    capsys.readouterr()
    assert main(["train", "--dataset", "mnist-5k", "--out", str(out), "--device", "cpu", "--no-progress"]) == 2
    _one_line_error(capsys, "already holds a run (checkpoint.pt, metrics.json)")
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--device", "cpu", "--no-progress"]) == 2
    _one_line_error(capsys, "it cannot be read")
    assert main(["train", "--dataset", "mnist-5k", "--epochs", "1", "--hidden-dim", "32", "--out", str(out),
                 "--device", "cpu", "--no-progress", "--no-figures", "--overwrite"]) == 0


def test_divergence_is_a_one_line_error_with_exit_3(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist-5k", "--lr", "10", "--epochs", "3", "--out", str(tmp_path / "r"),
                 "--device", "cpu", "--no-progress", "--no-figures"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fastvae train: error: training diverged in epoch 1")
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_evaluate_refuses_a_bit_flipped_checkpoint_and_says_what_it_does(tmp_path, capsys):
    out = tmp_path / "run"
    _small_run(out)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--iw-samples", "4", "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "IWAE bound with K=4" in err and "1000 mnist-5k test images" in err
    assert "image/s" not in err and "images/s" not in err  # --no-progress: no bar
    assert main(["evaluate", str(out), "--iw-samples", "4", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "IWAE bound, K=4" in err and "1000/1000" in err  # the progress bar, to the end
    import fastvae.training

    ckpt = fastvae.training.read_checkpoint(out)
    w = ckpt["model"]["fc4.bias"].reshape(-1)[200:204].numpy().tobytes()
    data = bytearray((out / "checkpoint.pt").read_bytes())
    data[data.index(w) + 2] ^= 0x40
    (out / "checkpoint.pt").write_bytes(bytes(data))
    assert main(["evaluate", str(out), "--iw-samples", "4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "SHA-256" in err and "Traceback" not in err


def test_decode_writes_into_the_run_folder_by_default(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _small_run(out)
    monkeypatch.chdir(tmp_path)
    assert main(["decode", str(out), "--z", ",".join(["0"] * 20)]) == 0
    assert (out / "decoded.png").stat().st_size > 1000 and not (tmp_path / "decoded.png").exists()


def test_decode_into_a_read_only_run_folder_is_one_line_exit_2_and_out_writes_elsewhere(tmp_path, monkeypatch,
                                                                                      capsys):
    import errno

    import fastvae.training

    out = tmp_path / "run"
    _small_run(out)
    capsys.readouterr()

    def read_only(path, mode="r", *args, **kwargs):  # tests run as root, who writes past chmod
        if mode != "r" and os.path.dirname(path) == str(out):
            raise OSError(errno.EROFS, "Read-only file system")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(fastvae.training, "open", read_only, raising=False)
    z = ",".join(["0"] * 20)
    assert main(["decode", str(out), "--z", z]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastvae decode: error: cannot write decoded.png in {out}: "
                                                   "Read-only file system"), lines
    assert "pass --out" in lines[0]
    assert not list(out.glob("*decoded*")) and not list(out.glob(".*tmp"))
    assert main(["decode", str(out), "--z", z, "--out", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").stat().st_size > 1000


@pytest.mark.parametrize("kind", ["pickled object", "plain pickle"])
def test_evaluate_on_a_file_that_is_not_a_checkpoint_never_suggests_unpickling(kind, tmp_path, capsys):
    import argparse
    import pickle

    path = tmp_path / "model.pt"
    if kind == "pickled object":  # a torch.save'd file holding a class instance
        torch.save({"model": argparse.Namespace(a=1), "model_config": {}}, path)
    else:
        path.write_bytes(pickle.dumps(argparse.Namespace(a=1), protocol=4))
    assert main(["evaluate", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"fastvae evaluate: error: {path} is not a fastvae checkpoint" in err, err
    assert "weights_only" not in err and "Traceback" not in err


def test_evaluate_refuses_non_finite_results_with_its_message(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _small_run(out)
    capsys.readouterr()
    monkeypatch.setattr(sys.modules["fastvae.evaluate"], "evaluate",
                        lambda *a, **k: {"n": 1000, "elbo": float("nan"), "test_loss": float("nan")})
    assert main(["evaluate", str(out), "--iw-samples", "0", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"fastvae evaluate: error: the evaluation of {out} gave non-finite values" in err
    assert "the checkpoint's model is unusable" in err
