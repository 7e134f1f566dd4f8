"""The whole training step recorded once as a CUDA graph and replayed (``run.compile_mode=graph|step``).

An eager BYOL step launches a few thousand kernels (augmentation, two networks forward and backward,
LARS, the online probe, the EMA); at small images and large batches the CPU cannot launch them as fast as
the GPU runs them. Replaying a recorded graph launches them all with one call. What makes the step
capturable (see ``engine.Pretrainer._step``):

- no host sync anywhere in it (a sync inside a capture is an error), and static shapes;
- its inputs copied into static buffers before each replay; lr and tau are device tensors the step reads
  (written before each replay), not Python numbers baked into the graph;
- the augmentation generator registered with the graph, so every replay draws new numbers (and
  re-seeding it at an epoch start takes effect);
- optimiser state (LARS momentum, the probe's Adam with ``capturable=True``) created by eager warm-up
  steps before the capture; the warm-up steps train like any other step.

Only the parameters' values change between replays: loading a checkpoint after the capture would replace
optimiser state the graph points at, so the capture happens at the first steps after any resume.

On a device without CUDA graphs the same protocol (warm-up, static buffers, "replay") runs eagerly: that
is how the CPU tests check what a GPU would record.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Batch = list[tuple[torch.Tensor, torch.Tensor]]

WARMUP_STEPS = 3  # eager steps on a side stream before the capture, as torch's CUDA graph docs do


class CapturedStep:
    """Calls `step(micro_batches) -> stats` eagerly `WARMUP_STEPS` times, then records it as a CUDA graph
    and replays it for every batch of the same shapes (a batch of other shapes runs eagerly)."""

    def __init__(
        self,
        step: Callable[[Batch], torch.Tensor],
        device: torch.device,
        generator: torch.Generator,
        warmup: int = WARMUP_STEPS,
    ):
        self.step, self.device, self.generator, self.warmup = step, device, generator, warmup
        self.eager_calls = 0
        self.graph: torch.cuda.CUDAGraph | _EagerReplay | None = None
        self.inputs: Batch = []
        self.output: torch.Tensor | None = None

    @staticmethod
    def signature(micro_batches: Batch) -> list[tuple]:
        return [(x.shape, x.dtype, y.shape, y.dtype) for x, y in micro_batches]

    def __call__(self, micro_batches: Batch) -> torch.Tensor:
        if self.graph is None and self.eager_calls < self.warmup:
            self.eager_calls += 1
            return self._on_side_stream(micro_batches)
        graph = self.graph
        if graph is None:
            graph = self._capture(micro_batches)
        elif self.signature(micro_batches) != self.signature(self.inputs):
            return self.step(micro_batches)
        for (sx, sy), (x, y) in zip(self.inputs, micro_batches):
            sx.copy_(x, non_blocking=True)
            sy.copy_(y, non_blocking=True)
        graph.replay()
        assert self.output is not None  # recorded by the capture (CUDA), or set by the eager replay just run
        return self.output

    def _on_side_stream(self, micro_batches: Batch) -> torch.Tensor:
        if self.device.type != "cuda":
            return self.step(micro_batches)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.step(micro_batches)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, micro_batches: Batch) -> torch.cuda.CUDAGraph | _EagerReplay:
        self.inputs = [(x.to(self.device).clone(), y.to(self.device).clone()) for x, y in micro_batches]
        if self.device.type != "cuda":
            self.graph = _EagerReplay(self)
            return self.graph
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            self.output = self.step(self.inputs)
        self.graph = graph  # recorded, not run: the caller's replay makes this step
        return graph


class _EagerReplay:
    """Stands in for the graph where there are no CUDA graphs: a replay runs the step on the static inputs."""

    def __init__(self, owner: CapturedStep):
        self.owner = owner

    def replay(self) -> None:
        self.owner.output = self.owner.step(self.owner.inputs)
