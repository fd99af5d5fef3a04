"""A model's forward captured as one CUDA graph, for one input shape.

At batch 1 X2P-Net's forward is a few hundred small kernels, and on a GPU as
fast as an H200 launching them takes longer than running them (the `paper`
config at 512: 27 ms eager in fp32, docs/gpu_latency.json). A CUDA graph records the launches once and replays them
as one, so a pair costs what its kernels cost. The graph reads its inputs from
and writes its outputs to fixed buffers: each call copies the inputs in and the
outputs out."""
from __future__ import annotations

import torch


class GraphedForward:
    def __init__(self, model: torch.nn.Module, images, P, prompt, bf16: bool = False, warmup: int = 3):
        """Captures model(images, P, prompt) for these inputs' shapes, dtypes and device (CUDA)."""
        self.model, self.bf16 = model, bf16
        self.inputs = tuple(t.clone() for t in (images, P, prompt))  # the graph's input buffers
        # warm-up on a side stream (cuDNN and cuBLAS choose their kernels and workspaces outside the graph)
        side = torch.cuda.Stream(self.inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.outputs = self._forward()  # the graph's output buffers

    def _forward(self) -> dict:
        # autocast's cache of cast weights would hold tensors made during capture: off, as torch requires in graphs
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            return self.model(*self.inputs)

    def fits(self, images, P, prompt) -> bool:
        """Whether these inputs have the captured shapes, dtypes and device."""
        return all(t.shape == s.shape and t.dtype == s.dtype and t.device == s.device
                   for t, s in zip((images, P, prompt), self.inputs))

    def __call__(self, images, P, prompt) -> dict:
        for buffer, t in zip(self.inputs, (images, P, prompt)):
            buffer.copy_(t)
        self.graph.replay()
        return {k: v.clone() for k, v in self.outputs.items()}
