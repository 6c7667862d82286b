"""Multi-process training: 2 gloo processes on CPU follow the single-process math."""
import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastvae


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _near_deterministic_model() -> fastvae.VAE:
    """A VAE whose posterior std is ~1e-13: z = mu to float precision, so the noise (which each
    rank draws independently) cannot make the runs differ; only the data-parallel math can."""
    torch.manual_seed(0)
    model = fastvae.VAE(784, 32, 3)
    with torch.no_grad():
        model.fc22.weight.zero_()
        model.fc22.bias.fill_(-60.0)
    return model


def _worker(rank, world, port, data, out_dirs, kwargs):
    # what torchrun sets; loopback only
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    fastvae.train(data, init=_near_deterministic_model(), out_dir=out_dirs[rank], **kwargs)
    assert not dist.is_initialized()  # train() tears down the group it made
    # and its DDP module (which holds the group) is gone, not left to a later garbage collection:
    # gloo's threads end with the group, before interpreter exit (where one that still released
    # an all_gather's tensors aborted the process about 1 run in 8)
    from torch.nn.parallel import DistributedDataParallel

    assert not any(isinstance(o, DistributedDataParallel) for o in gc.get_objects())


@pytest.fixture(scope="module")
def data():
    return fastvae.load_dataset("mnist-5k").subset(300, 50)


def test_two_gloo_processes_match_single_process(data, tmp_path):
    # fp32 pinned: "auto" picks bf16 autocast on a CPU with native bf16, whose rounding differs
    # between the two ranks' half batches and the single process's whole batch
    kwargs = dict(epochs=2, batch_size=100, lr=1e-2, device="cpu", progress=False, figures=False,
                  precision="fp32")
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    mp.spawn(_worker, args=(2, _free_port(), data, dirs, kwargs), nprocs=2, join=True)
    single = fastvae.train(data, init=_near_deterministic_model(), out_dir=tmp_path / "single", **kwargs)

    assert (dirs[0] / "checkpoint.pt").exists() and (dirs[0] / "metrics.json").exists()
    assert not dirs[1].exists(), "only rank 0 writes"
    ddp = torch.load(dirs[0] / "checkpoint.pt", weights_only=True)
    assert ddp["epoch"] == 2 and len(ddp["rng"]["noise"]) == 2
    # 6 Adam steps on the same global batches: the same weights up to float summation order
    start = _near_deterministic_model().state_dict()
    for name, p in single.model.state_dict().items():
        assert not torch.allclose(p, start[name]) or name.startswith("fc22.weight"), name
        torch.testing.assert_close(ddp["model"][name], p, rtol=1e-4, atol=1e-5, msg=name)
    # the reported losses are those of the whole training and test sets
    for a, b in zip(ddp["history"]["train_loss"], single.metrics["train_loss"]):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(ddp["history"]["test_loss"], single.metrics["test_loss"]):
        assert a == pytest.approx(b, rel=1e-5)


def _noise_worker(rank, world, port, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fastvae.training import Trainer, _Dist

        trainer = Trainer(fastvae.VAE(784, 16, 3), {"batch_size": 8, "lr": 1e-3, "beta": 1.0, "seed": 1},
                          torch.device("cpu"), _Dist(rank, world, rank, False))
        # the noise of a training step, drawn as the model's forward draws it (from the trainer's
        # noise generator), with mu = 0 and logvar = 0 so that z is the noise itself
        model = trainer.model
        with torch.no_grad():
            for layer in (model.fc21, model.fc22):
                layer.weight.zero_()
                layer.bias.zero_()
            mu, logvar = model.encode(torch.zeros(4, 784))
            z = fastvae.reparameterize(mu, logvar, generator=trainer.noise_gen, backend=model.backend)
        gathered = [torch.empty_like(z) for _ in range(world)]
        dist.all_gather(gathered, z)
        if rank == 0:
            torch.save(torch.stack(gathered), out_file)
    finally:
        dist.destroy_process_group()


def test_ranks_draw_different_noise(tmp_path):
    out = tmp_path / "noise.pt"
    mp.spawn(_noise_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    z = torch.load(out, weights_only=True)
    assert z.shape == (2, 4, 3) and z.std() > 0.5  # real N(0, 1) draws
    assert not torch.allclose(z[0], z[1]), "both ranks drew the same noise"
