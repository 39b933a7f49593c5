"""A training step's forward and backward replayed as one captured CUDA graph.

On a GPU this model's step is many small kernels that take longer to launch one by one than
to run: on an H200 a 64-frame step took ~6.2-7.3 ms eagerly and ~1.5 ms replayed from a graph
(`benchmarks/README.md`, "On a GPU with CUDA graphs"). The optimizer step and the
learning-rate schedule stay eager, so they are the same code on every device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
# Eager steps before the capture: cuBLAS and cuDNN make their handles and workspaces in the
# first calls, which a capture must not see.
WARMUP_STEPS = 3
T = TypeVar("T")


def wants_cuda_graph(choice: str, device: torch.device) -> bool:
    """True when ``--cuda_graph`` (auto, off) asks for graphs and ``device`` is a CUDA one."""
    return choice == "auto" and device.type == "cuda"


class GraphedBackward:
    """``backward(index)`` (loss and gradients of the frames at ``index``, (B,) int64 on the
    GPU) replayed from a graph for every batch of ``batch_size`` after the first few.

    Once captured, the gradients live in the graph's tensors and each replay overwrites them,
    so they are zeroed in place, never set to None. Batches of another size (an epoch's
    partial last one) and every batch after a failed capture run eagerly, on the same stream.
    """

    def __init__(self, backward: Callable[[torch.Tensor], T],
                 params: Sequence[torch.nn.Parameter], batch_size: int) -> None:
        self._backward, self._params, self._batch_size = backward, list(params), batch_size
        # Streams, synchronisation and the capture act on the current CUDA device, which
        # --device cuda:N does not set: each call makes the parameters' device current.
        self._device = self._params[0].device
        self._stream = torch.cuda.Stream(self._device)  # warm-up and capture (cuBLAS handles)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._index: torch.Tensor | None = None
        self._result: T | None = None
        self._full_batches = 0
        self._failed = False

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self, index: torch.Tensor) -> T:
        with torch.cuda.device(self._device):
            return self._step(index)

    def _step(self, index: torch.Tensor) -> T:
        if len(index) != self._batch_size or self._failed:
            return self._eager(index)
        self._full_batches += 1
        if self._full_batches <= WARMUP_STEPS or (self._graph is None
                                                   and not self._capture(index)):
            return self._eager(index)
        self._index.copy_(index)
        self._graph.replay()
        return self._result

    def _zero_grads(self) -> None:
        for p in self._params:
            if self._graph is None:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _eager(self, index: torch.Tensor) -> T:
        # On the capture stream, like the capture: autograd keeps each parameter's gradient
        # accumulator while a loss holds its graph, and warns when it meets another stream.
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            self._zero_grads()
            result = self._backward(index)
        torch.cuda.current_stream().wait_stream(self._stream)
        return result

    def _capture(self, index: torch.Tensor) -> bool:
        """Record one step into a graph (nothing runs yet); False, logged, if CUDA refuses."""
        self._zero_grads()  # the graph's backward then makes the gradients its own tensors
        self._index = index.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            # thread_local: a logging or upload thread touching CUDA does not spoil the capture
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                result = self._backward(self._index)
        except RuntimeError as exc:
            log.warning("CUDA graph capture failed, training eagerly: %s", exc)
            self._failed, self._result = True, None
            self._zero_grads()
            return False
        # Detached views of the graph's outputs (replays still write into them): attached,
        # they would keep the captured autograd graph's nodes alive for the whole run.
        self._graph, self._result = graph, _detached(result)
        log.info("training steps of %d frames replay one CUDA graph from step %d on",
                 self._batch_size, self._full_batches)
        return True


def _detached(result: T) -> T:
    """``result`` (a tensor or a NamedTuple of them) detached; storage shared, so each replay
    still writes into it."""
    if isinstance(result, torch.Tensor):
        return result.detach()
    return result._make(t.detach() for t in result)
