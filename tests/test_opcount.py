"""The launch-count instrument of ``benchmarks.opcount``: what it counts, and the floor it replays."""

from __future__ import annotations

import pytest
import torch

from benchmarks.opcount import OpCounter, UNetCall, recorded_calls, stock_call_ops
from editkit.attention import AttentionController, attach


def test_counter_counts_compute_and_backward_but_not_views():
    x = torch.randn(3, 4, requires_grad=True)
    with OpCounter() as counter:
        y = (x.t() @ x).sin().sum()  # t is a view; mm, sin, sum compute
    forward = counter.count
    assert forward == 3 and counter.by_op["mm"] == 1 and "t" not in counter.by_op
    with OpCounter() as counter:
        torch.autograd.grad(y, x)
    assert counter.count > 0 and counter.by_op["mm"] == 2  # the backward of x.t() @ x: two products


@pytest.fixture(scope="module")
def unet():
    from editkit.testing import tiny_sd15_components

    return tiny_sd15_components(seed=0)["unet"].eval().requires_grad_(False)


def test_pass_through_processor_dispatches_exactly_stock_operations(unet):
    """editkit's processor with the identity controller launches no more kernels than AttnProcessor2_0."""
    call = UNetCall((2, 4, 16, 16), (2, 77, 16), grad=False, stopped_after=None)
    stock = sum(stock_call_ops(unet, call).values())
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 16)
    with torch.no_grad(), attach(unet, AttentionController()), OpCounter() as counter:
        unet(sample, torch.tensor(500), encoder_hidden_states=context)
    assert counter.count == stock


def test_recorded_calls_note_shapes_grad_and_early_exit(unet):
    site = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"

    class StopError(Exception):
        pass

    def stop(module, args, output):
        raise StopError

    calls: list[UNetCall] = []
    sample = torch.randn(1, 4, 16, 16, requires_grad=True)
    context = torch.randn(1, 77, 16)
    with recorded_calls(unet, calls):
        with torch.no_grad():
            unet(sample, torch.tensor(10), encoder_hidden_states=context)
        handle = unet.get_submodule(site).register_forward_hook(stop)
        try:
            with torch.enable_grad(), pytest.raises(StopError):
                unet(sample, torch.tensor(10), encoder_hidden_states=context)
        finally:
            handle.remove()
    assert [c.grad for c in calls] == [False, True]
    assert calls[0].stopped_after is None and calls[1].stopped_after == site  # the last layer that finished
    assert calls[0].sample_shape == (1, 4, 16, 16) and calls[1].context_shape == (1, 77, 16)
    full = sum(stock_call_ops(unet, UNetCall((1, 4, 16, 16), (1, 77, 16), grad=True, stopped_after=None)).values())
    early = sum(stock_call_ops(unet, calls[1]).values())
    assert 0 < early < full  # the replayed early exit skips the rest of the UNet and its backward
