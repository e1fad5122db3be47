"""The shared attention layer: bit-exact pass-through, attach/restore, kernels, stores."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from torch.utils._python_dispatch import TorchDispatchMode

from editkit.attention import (
    AttentionController,
    ControllerList,
    CrossAttentionMapStore,
    EditkitAttnProcessor,
    QKVRecorder,
    SelfAttentionOutputRecorder,
    Site,
    attach,
    attention_sites,
    explicit_attention,
    infer_grid,
    select_sites,
)


def _unet_inputs(unet, batch=2, size=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=generator)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, dtype=torch.float32),
        }
    return sample, torch.tensor(500), context, kwargs


def _run(unet, inputs):
    sample, t, context, kwargs = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]


@pytest.mark.parametrize("pipe_name", ["sd15_pipe", "sdxl_pipe"])
def test_identity_controller_is_bit_exact(pipe_name, request):
    unet = request.getfixturevalue(pipe_name).unet
    unet.set_attn_processor(AttnProcessor2_0())
    inputs = _unet_inputs(unet, size=12)  # non-power-of-two latent: odd grids at the deeper levels
    reference = _run(unet, inputs)
    with attach(unet, AttentionController()):
        assert all(isinstance(p, EditkitAttnProcessor) for p in unet.attn_processors.values())
        controlled = _run(unet, inputs)
    assert torch.equal(reference, controlled)


def test_sites_are_named_and_classified(sd15_pipe, sdxl_pipe):
    sites = attention_sites(sd15_pipe.unet)
    assert len(sites) == 32
    by_name = {s.name: s for s in sites}
    site = by_name["up_blocks.2.attentions.1.transformer_blocks.0.attn1"]
    assert (site.block, site.block_index, site.kind) == ("up", 2, "self")
    mid = by_name["mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert (mid.block, mid.kind) == ("mid", "cross")
    xl = {s.name for s in attention_sites(sdxl_pipe.unet)}
    assert "up_blocks.1.attentions.2.transformer_blocks.0.attn1" in xl
    assert select_sites(xl, "up_blocks.1.attentions.1", kind="self") == [
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
    ]
    with pytest.raises(ValueError, match="matches no"):
        select_sites(xl, "up_blocks.7")


def test_infer_grid_handles_odd_latents():
    assert infer_grid(12 * 20, (12, 20)) == (12, 20)
    assert infer_grid(3 * 5, (12, 20)) == (3, 5)
    assert infer_grid(2 * 3, (9, 17)) == (2, 3)  # ceil halving: 9x17 -> 5x9 -> 3x5 -> 2x3
    assert infer_grid(64, None) == (8, 8)


class _BoomError(RuntimeError):
    pass


def test_attach_restores_original_objects_also_on_error(sd15_pipe):
    unet = sd15_pipe.unet
    before = dict(unet.attn_processors)
    with pytest.raises(_BoomError), attach(unet, AttentionController()):
        raise _BoomError
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)


class _Recorder(AttentionController):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.seen = kind, []

    def applies_to(self, site):
        return site.kind == self.kind

    def on_output(self, site, hidden_states):
        self.seen.append(site.name)
        return hidden_states


def test_nested_attach_composes_and_restores(sd15_pipe):
    unet = sd15_pipe.unet
    before = dict(unet.attn_processors)
    outer, inner = _Recorder("self"), _Recorder("cross")
    inputs = _unet_inputs(unet)
    with attach(unet, outer):
        with attach(unet, inner):
            _run(unet, inputs)
        assert len(outer.seen) == 16 and len(inner.seen) == 16
        assert all(isinstance(p, EditkitAttnProcessor) for k, p in unet.attn_processors.items() if "attn1" in k)
        assert all(p is before[k] for k, p in unet.attn_processors.items() if "attn2" in k)
    assert all(unet.attn_processors[k] is before[k] for k in before)


def test_ip_adapter_processor_is_kept_working(sd15_pipe):
    unet = sd15_pipe.unet
    torch.manual_seed(3)
    processors = dict(unet.attn_processors)
    for key, module in unet.named_modules():
        if key.endswith("attn2"):
            adapter = IPAdapterAttnProcessor2_0(module.to_q.out_features, 16, num_tokens=(4,), scale=0.8)
            processors[key + ".processor"] = adapter
    unet.set_attn_processor(dict(processors))
    try:
        sample, t, context, _ = _unet_inputs(unet)
        image_tokens = [torch.randn(2, 4, 16)]
        with torch.no_grad():
            reference = unet(sample, t, encoder_hidden_states=(context, image_tokens), return_dict=False)[0]
            recorder = _Recorder("cross")
            with attach(unet, recorder):
                controlled = unet(sample, t, encoder_hidden_states=(context, image_tokens), return_dict=False)[0]
            without_image = unet(sample, t, encoder_hidden_states=(context, [0 * image_tokens[0]]))[0]
        assert len(recorder.seen) == 16
        torch.testing.assert_close(controlled, reference, atol=1e-6, rtol=0)
        assert not torch.allclose(without_image, reference)  # the image prompt matters
        assert all(unet.attn_processors[k] is processors[k] for k in processors)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())


def test_explicit_probabilities_match_sdpa_and_carry_gradients():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 37, 8, generator=generator, requires_grad=True)
    key = torch.randn(2, 3, 11, 8, generator=generator)
    value = torch.randn(2, 3, 11, 8, generator=generator)
    pieces = []
    out = explicit_attention(query, key, value, scale=0.7, chunk_size=10, on_probs=lambda p, rows: pieces.append(p))
    probs = torch.cat(pieces, dim=-2)
    assert probs.shape == (2, 3, 37, 11)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 37))
    reference = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=0.7)
    assert (out - reference).abs().max() < 1e-5
    probs[..., 0].sum().backward()
    assert query.grad is not None and query.grad.abs().sum() > 0


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_explicit_path_memory_is_bounded_by_chunk(chunk_size):
    query, key, value = (torch.randn(1, 2, 256, 4) for _ in range(3))
    with _LargestAllocation() as mode:
        explicit_attention(query, key, value, chunk_size=chunk_size, on_probs=lambda p, rows: None)
    # the biggest intermediate is one chunk of logits, never the 256 x 256 map (the output is 2*256*4)
    assert mode.largest == max(2 * chunk_size * 256, 2 * 256 * 4)


def test_map_store_on_unet_sums_to_one_and_has_gradients(sd15_pipe):
    unet = sd15_pipe.unet
    sample, t, context, _ = _unet_inputs(unet, size=16)
    sample.requires_grad_(True)
    store = CrossAttentionMapStore(grids=[(4, 4)], role="cond", with_grad=True)
    with attach(unet, store, chunk_size=5):
        store.batch_roles = ("uncond", "cond")
        unet(sample, t, encoder_hidden_states=context)
    assert set(store.maps) == {
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
    }
    maps = store.aggregate((4, 4))
    assert maps.shape == (1, 4, 4, 77)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 4, 4))
    maps[..., 3].max().backward()
    assert sample.grad[1].abs().sum() > 0  # the conditional row received gradient
    assert sample.grad[0].abs().sum() == 0  # the unconditional row was not stored


def test_stores_overwrite_by_site_under_repeated_calls(sd15_pipe):
    unet = sd15_pipe.unet
    inputs = _unet_inputs(unet)
    recorder = QKVRecorder(sites="up_blocks.3", keep=("query",))
    outputs = SelfAttentionOutputRecorder(sites="up_blocks.2", role="target")
    with attach(unet, [recorder, outputs]):
        outputs.batch_roles = ("source", "target")
        recorder.begin_step(0, 981)
        _run(unet, inputs)
        first = {k: v["query"].clone() for k, v in recorder.records.items()}
        _run(unet, inputs)  # as gradient checkpointing does: the same step twice
    assert len(recorder.records) == 3 and len(outputs.outputs) == 3
    assert all(k[1] == 981 for k in recorder.records)
    assert all(torch.equal(first[k], v["query"]) for k, v in recorder.records.items())
    assert all(v["query"].dtype == torch.float16 and set(v) == {"query"} for v in recorder.records.values())
    assert all(t.shape[0] == 1 for t in outputs.outputs.values())


def test_controller_list_chains_hooks_in_order():
    site = Site.from_name("up_blocks.1.attentions.0.transformer_blocks.0.attn1")

    class Scale(AttentionController):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def softmax_scale(self, site, default):
            return (default or 1.0) * self.factor

    chain = ControllerList([Scale(2.0), Scale(3.0)])
    assert chain.softmax_scale(site, None) == 6.0
    chain.batch_roles = ("uncond", "cond")
    assert chain.controllers[1].role_rows("cond", 4) == slice(2, 4)
    with pytest.raises(ValueError, match="cannot hold"):
        chain.controllers[0].role_rows("cond", 3)


def test_fused_projections_match_unfused_and_reach_the_controller():
    """After fuse_qkv_projections (FusedAttnProcessor2_0 on every layer) the controller still sees q, k, v."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    from editkit.testing import tiny_sd15_components

    unet = tiny_sd15_components(seed=0)["unet"]
    inputs = _unet_inputs(unet)
    with attach(unet, AttentionController()):
        unfused = _run(unet, inputs)

    class Queries(AttentionController):
        seen: ClassVar[dict] = {}

        def on_qkv(self, site, query, key, value):
            self.seen[site.name] = query.shape
            return query, key, value

    unet.fuse_qkv_projections()
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in unet.attn_processors.values())
    stock = _run(unet, inputs)
    with attach(unet, Queries()):
        fused = _run(unet, inputs)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused, stock, atol=1e-6, rtol=1e-5)
    assert len(Queries.seen) == 32  # every site ran editkit's processor
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in unet.attn_processors.values())  # restored


def test_inserted_context_tokens_are_removed_from_maps(sd15_pipe):
    unet = sd15_pipe.unet

    class Insert(AttentionController):
        def applies_to(self, site):
            return site.is_cross

        def inserted_tokens(self, site):
            return (1, 3)

        def on_context(self, site, context):
            extra = torch.zeros(context.shape[0], 3, context.shape[2])
            return torch.cat([context[:, :1], extra, context[:, 1:]], dim=1)

    store = CrossAttentionMapStore(grids=[(4, 4)], role=None)
    with attach(unet, [Insert(), store]):
        _run(unet, _unet_inputs(unet))
    maps = store.aggregate()
    assert maps.shape[-1] == 77  # the prompt's own tokens, indices unshifted
    assert (maps.sum(-1) < 1).all()  # the inserted tokens took some of the attention
