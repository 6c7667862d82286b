"""``fastvae.train``'s step on CUDA as one CUDA graph: batch gather, forward, fused loss, backward,
Adam, and the epoch's running loss, replayed with one launch per step.

A step's host work in eager mode (dozens of kernel launches, autograd, the optimizer's Python) costs
more than its GPU work at MNIST sizes; a replayed graph costs one launch. What capturing the whole
step takes:

* **Static inputs.** Each batch size has its own graph, reading the batch's row indices from a
  static buffer (copied in before each replay) and the training images from the data set's one
  device tensor. The last, smaller batch of an epoch gets a graph of its own.
* **Warm-up.** The first step of each batch size runs eagerly on a side stream (it trains like any
  other step): cuBLAS, autograd and Adam's state are set up before the capture.
* **Adam** is created with ``capturable=True`` (its step count lives on the device).
* **Noise.** The generator of the reparameterisation noise is registered with each graph, so every
  replay draws fresh noise, the same as an eager step would from the same state.
* **bf16** autocast runs without its weight cache (a cache filled during capture would go stale).
* **Metrics** are summed on the device inside the graph; the epoch reads them once.

Not captured (the eager step runs): CPU training, several processes (DDP), ``compile=True`` (its
own "reduce-overhead" graphs), the IWAE objective.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor


def unsupported_reason(device: torch.device, world: int, compile: bool, objective: str) -> Optional[str]:
    """Why the graph step does not apply to this run, or None where it does."""
    if device.type != "cuda":
        return "not on CUDA"
    if world > 1:
        return "several processes (DDP)"
    if compile:
        return "compile=True (torch.compile's own CUDA graphs)"
    if objective != "elbo":
        return f"objective {objective!r}"
    return None


class GraphStep:
    """Replays one captured training step per batch size for a :class:`fastvae.training.Trainer`
    whose optimizer is a capturable Adam. ``run(x, idx)`` trains on the rows ``idx`` of ``x``
    (the data set's images on the device) and adds the batch's summed loss to :attr:`total`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.total = torch.zeros((), dtype=torch.float64, device=trainer.device)
        self.graphs: dict = {}        # (x's storage, batch size) -> (graph, static indices)
        self.warm: set = set()

    def run(self, x: Tensor, idx: Tensor) -> None:
        key = (x.data_ptr(), x.shape, idx.numel())
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.warm:
                self.warm.add(key)
                self._eager(x, idx)
                return
            entry = self.graphs[key] = self._capture(x, idx.numel())
        graph, static_idx = entry
        static_idx.copy_(idx)
        graph.replay()

    def _eager(self, x: Tensor, idx: Tensor) -> None:
        # the warm-up: a real step, on a side stream as the capture will be
        opt = self.trainer.opt
        opt.zero_grad(set_to_none=True)  # a graph's gradients must not be accumulated into
        with side_stream(self.trainer.device):
            loss = self.trainer.forward_loss(x.index_select(0, idx))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.total += loss.detach()

    def _capture(self, x: Tensor, batch: int):
        trainer, opt = self.trainer, self.trainer.opt
        static_idx = torch.zeros(batch, dtype=torch.int64, device=x.device)

        def step():
            # gradients None before the backward: it writes them anew (what a replay repeats), and
            # run as plain code this function is one replay
            opt.zero_grad(set_to_none=True)
            loss = trainer.forward_loss(x.index_select(0, static_idx))
            loss.backward()
            opt.step()
            self.total += loss.detach()

        graph = capture(step, trainer.noise_gen)
        # the gradients live in the graph's memory; eager steps must start from None again
        opt.zero_grad(set_to_none=True)
        return graph, static_idx


@contextlib.contextmanager
def side_stream(device: torch.device):
    """Run the block on a new CUDA stream that waits for the current one, and make the current
    one wait for it afterwards (the warm-up before a capture)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)


def capture(step, generator: torch.Generator):
    """``step`` captured into a new CUDA graph (recorded, not run) that draws its noise from
    ``generator`` afresh on every replay."""
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        step()
    return graph
