"""Training steps replayed as a CUDA graph: the gradients of every batch match eager ones, and a
graphed run learns like an eager one. The CUDA tests run where a GPU is present
(`benchmarks/gpu.sh` runs this file); elsewhere the choice of path is pinned."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from atari_vae.cuda_graph import WARMUP_STEPS, GraphedBackward, wants_cuda_graph
from tests.conftest import tiny_fit

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_graphs_are_wanted_on_cuda_only_and_only_with_auto() -> None:
    assert wants_cuda_graph("auto", torch.device("cuda"))
    assert wants_cuda_graph("auto", torch.device("cuda", 1))
    assert not wants_cuda_graph("off", torch.device("cuda"))
    assert not wants_cuda_graph("auto", torch.device("cpu"))
    assert not wants_cuda_graph("auto", torch.device("mps"))


def _linear_backward(model: torch.nn.Linear, data: torch.Tensor):
    def backward(index: torch.Tensor) -> torch.Tensor:
        loss = model(data[index]).pow(2).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return loss
    return backward


@needs_cuda
def test_every_replayed_batch_gets_the_gradients_an_eager_step_computes() -> None:
    """Warm-up, capture, replays and a partial batch after them: the gradients are each
    batch's own (overwritten, not accumulated) and the loss is the batch's."""
    torch.manual_seed(0)
    data = torch.randn(64, 5, device="cuda")
    graphed_model = torch.nn.Linear(5, 3).cuda()
    eager_model = torch.nn.Linear(5, 3).cuda()
    eager_model.load_state_dict(graphed_model.state_dict())
    graphed = GraphedBackward(_linear_backward(graphed_model, data),
                              list(graphed_model.parameters()), batch_size=8)
    eager = _linear_backward(eager_model, data)
    batches = [torch.randperm(64, device="cuda")[:8] for _ in range(WARMUP_STEPS + 4)]
    batches.insert(WARMUP_STEPS + 2, torch.arange(5, device="cuda"))  # a partial batch
    batches.append(batches[-1])  # the same batch twice: no accumulation
    for index in batches:
        loss = graphed(index)
        eager_model.zero_grad(set_to_none=True)
        expected = eager(index)
        torch.testing.assert_close(loss, expected)
        for got, want in zip(graphed_model.parameters(), eager_model.parameters(), strict=True):
            torch.testing.assert_close(got.grad, want.grad)
    assert graphed.captured


TINY_CUDA_FP32 = dict(device="cuda", precision="fp32", batch_size=16, epochs=3)


@needs_cuda
def test_a_graphed_run_learns_like_an_eager_one(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="atari_vae.cuda_graph"):
        graphed = tiny_fit(tmp_path / "graphed", **TINY_CUDA_FP32)
    assert "replay one CUDA graph" in caplog.text
    eager = tiny_fit(tmp_path / "eager", cuda_graph="off", **TINY_CUDA_FP32)
    for run in (graphed, eager):
        losses = [h["train_loss"] for h in run.history]
        assert losses[-1] < losses[0]
    # The reparameterisation noise differs between the paths; the runs must still agree.
    assert graphed.history[-1]["val_loss"] == pytest.approx(eager.history[-1]["val_loss"],
                                                            rel=0.02)
    assert [h["lr"] for h in graphed.history] == [h["lr"] for h in eager.history]
