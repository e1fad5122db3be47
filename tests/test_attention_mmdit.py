"""The shared attention layer on MM-DiT transformers (SD3, SD3.5 with attn2, FLUX.1).

Tiny transformers are built here (the constructors of ``shared/design/mmdit.md``); references are
computed in the tests from the layers' own weights and diffusers' stock processors, not from
editkit's processors.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from benchmarks.opcount import OpCounter
from editkit.attention import (
    AttentionController,
    CrossAttentionMapStore,
    EditkitFluxAttnProcessor,
    EditkitJointAttnProcessor,
    QKVRecorder,
    SelfAttentionOutputRecorder,
    TokenLayout,
    attach,
    attention_sites,
    compose,
    select_sites,
)
from editkit.testing_mmdit import tiny_flux_transformer, tiny_sd3_transformer

SD3_GRID = (8, 6)  # latent height, width (patch 1): a non-square grid
FLUX_GRID = (4, 6)
TEXT_TOKENS = 5


def _sd3(dual: bool) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return tiny_sd3_transformer(num_layers=2, sd35=dual, sample_size=32)


def _flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return tiny_flux_transformer(num_layers=2, guidance_embeds=False)


@pytest.fixture(scope="module")
def models():
    return {"sd3": _sd3(dual=False), "sd35": _sd3(dual=True), "flux": _flux()}


def _inputs(family: str, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(batch, TEXT_TOKENS, 32, generator=generator)
    if family == "flux":
        rows, cols = FLUX_GRID
        ids = torch.zeros(rows, cols, 3)
        ids[..., 1] = torch.arange(rows)[:, None]
        ids[..., 2] = torch.arange(cols)[None, :]
        return {
            "hidden_states": torch.randn(batch, rows * cols, 4, generator=generator),
            "encoder_hidden_states": context,
            "pooled_projections": torch.randn(batch, 32, generator=generator),
            "timestep": torch.full((batch,), 0.5),
            "img_ids": ids.reshape(-1, 3),
            "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        }
    return {
        "hidden_states": torch.randn(batch, 4, *SD3_GRID, generator=generator),
        "encoder_hidden_states": context,
        "pooled_projections": torch.randn(batch, 64, generator=generator),
        "timestep": torch.full((batch,), 500.0),
    }


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


class _SiteLog(AttentionController):
    """Records the site (with its layout) each call's ``on_qkv`` saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = {}

    def on_qkv(self, site, query, key, value):
        self.seen[site.name] = (site, query.shape, key.shape)
        return query, key, value


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_identity_controller_is_bit_exact_and_restores_originals(models, family):
    model = models[family]
    originals = dict(model.attn_processors)
    inputs = _inputs(family)
    reference = _run(model, inputs)
    with attach(model, AttentionController()):
        installed = model.attn_processors.values()
        assert all(isinstance(p, (EditkitJointAttnProcessor, EditkitFluxAttnProcessor)) for p in installed)
        controlled = _run(model, inputs)
    assert torch.equal(reference, controlled)
    assert all(model.attn_processors[name] is processor for name, processor in originals.items())


def test_attach_restores_originals_when_the_body_raises(models):
    model = models["flux"]
    originals = dict(model.attn_processors)
    with pytest.raises(RuntimeError, match="boom"), attach(model, AttentionController()):
        raise RuntimeError("boom")
    assert all(model.attn_processors[name] is processor for name, processor in originals.items())


def test_sites_have_kinds_and_layouts(models):
    kinds = {family: {s.name: s.kind for s in attention_sites(models[family])} for family in models}
    assert kinds["sd3"] == {"transformer_blocks.0.attn": "joint", "transformer_blocks.1.attn": "joint"}
    assert kinds["sd35"]["transformer_blocks.0.attn2"] == "image_self"
    assert kinds["flux"]["transformer_blocks.1.attn"] == "joint"
    assert kinds["flux"]["single_transformer_blocks.1.attn"] == "single"
    assert select_sites(attention_sites(models["flux"]), None, kind="single") == [
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    ]

    image_tokens = {"sd35": SD3_GRID[0] * SD3_GRID[1], "flux": FLUX_GRID[0] * FLUX_GRID[1]}
    logs = {}
    for family in ("sd35", "flux"):
        with attach(models[family], _SiteLog()) as log:
            _run(models[family], _inputs(family))
        logs[family] = log.seen
    joint, _, _ = logs["sd35"]["transformer_blocks.0.attn"]
    assert joint.layout == TokenLayout(image_tokens["sd35"], TEXT_TOKENS, text_first=False)
    assert (joint.layout.image, joint.layout.text) == (slice(0, 48), slice(48, 53))
    assert joint.grid == SD3_GRID
    image_only, query_shape, _ = logs["sd35"]["transformer_blocks.0.attn2"]
    assert image_only.layout.text_tokens == 0 and query_shape[2] == 48
    for name in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"):
        site, query_shape, key_shape = logs["flux"][name]
        assert (site.layout.text, site.layout.image) == (slice(0, 5), slice(5, 29))
        assert site.grid == FLUX_GRID  # read from img_ids, not guessed from a square
        assert query_shape == key_shape == (2, 2, 29, 16)  # (batch, heads, text + image, head_dim)


class _Inputs:
    """Forward pre-hooks capturing each attention layer's inputs (with their keyword names)."""

    def __init__(self, model) -> None:
        self.calls = {}
        self.handles = [
            module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name, module in model.named_modules()
            if hasattr(module, "get_processor")
        ]

    def _hook(self, name):
        def hook(module, args, kwargs):
            self.calls[name] = (module, {**dict(zip(("hidden_states", "encoder_hidden_states"), args)), **kwargs})

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _reference_qk(attn, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
    """Joint q, k ``(batch, heads, tokens, head_dim)`` straight from the layer's weights, and the layout."""
    hidden, context = kwargs["hidden_states"], kwargs.get("encoder_hidden_states")
    heads, head_dim = attn.heads, attn.to_q.out_features // attn.heads

    def split(tensor):
        return tensor.unflatten(-1, (heads, head_dim))  # (batch, tokens, heads, head_dim)

    query, key = attn.norm_q(split(attn.to_q(hidden))), attn.norm_k(split(attn.to_k(hidden)))
    rotary = kwargs.get("image_rotary_emb")
    if rotary is None:  # SD3: [image; text]
        text_query, text_key = (
            attn.norm_added_q(split(attn.add_q_proj(context))),
            attn.norm_added_k(split(attn.add_k_proj(context))),
        )
        query, key = torch.cat([query, text_query], 1), torch.cat([key, text_key], 1)
        layout = TokenLayout(hidden.shape[1], context.shape[1], text_first=False)
    else:  # FLUX: [text; image], rotary angles on both
        if context is not None:
            query = torch.cat([attn.norm_added_q(split(attn.add_q_proj(context))), query], 1)
            key = torch.cat([attn.norm_added_k(split(attn.add_k_proj(context))), key], 1)
        text_tokens = TEXT_TOKENS
        layout = TokenLayout(query.shape[1] - text_tokens, text_tokens, text_first=True)
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    return query.transpose(1, 2), key.transpose(1, 2), layout


@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_map_store_equals_a_reference_softmax_of_image_queries_over_text_keys(models, family):
    model = models[family]
    store = CrossAttentionMapStore(grids=None, role=None)
    captured = _Inputs(model)
    try:
        with torch.no_grad(), attach(model, store, chunk_size=7):  # chunks straddle the image/text border
            _run(model, _inputs(family))
    finally:
        captured.remove()
    expected_sites = {s.name for s in attention_sites(model) if s.kind in ("joint", "single")}
    assert set(store.maps) == expected_sites
    grid = SD3_GRID if family == "sd35" else FLUX_GRID
    with torch.no_grad():
        for name, stored in store.maps.items():
            attn, kwargs = captured.calls[name]
            query, key, layout = _reference_qk(attn, kwargs)
            probs = (query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])).softmax(dim=-1)
            reference = probs[:, :, layout.image, layout.text].mean(dim=1).reshape(2, *grid, TEXT_TOKENS)
            assert stored.shape == (2, *grid, TEXT_TOKENS)
            torch.testing.assert_close(stored, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_recorders_keep_the_parts_the_layout_names(models, family):
    model = models[family]
    kinds = ("joint", "image_self", "single")
    joint = QKVRecorder(kind=kinds, dtype=None)
    image = QKVRecorder(kind=kinds, dtype=None, part="image", keep=("key",))
    text = QKVRecorder(kind="joint", dtype=None, part="text", keep=("value",))
    outputs = SelfAttentionOutputRecorder()
    captured = _Inputs(model)
    try:
        with torch.no_grad(), attach(model, [joint, image, text, outputs]) as controller:
            controller.begin_step(0, 500)
            _run(model, _inputs(family))
    finally:
        captured.remove()
    sites = {s.name: s for s in attention_sites(model)}
    assert set(outputs.outputs) == set(sites)
    for name, site in sites.items():
        attn, kwargs = captured.calls[name]
        stock = JointAttnProcessor2_0() if family == "sd35" else FluxAttnProcessor()
        with torch.no_grad():
            expected = stock(attn, **kwargs)
        expected = expected[0] if isinstance(expected, tuple) else expected
        if site.kind == "single":
            expected = expected[:, TEXT_TOKENS:]  # the image part of the joint output
        assert torch.equal(outputs.outputs[name], expected)

        record = joint.records[(name, 500)]
        image_tokens = kwargs["hidden_states"].shape[1] - (TEXT_TOKENS if site.kind == "single" else 0)
        text_tokens = 0 if site.kind == "image_self" else TEXT_TOKENS
        head_dim = attn.to_q.out_features // attn.heads
        assert record["query"].shape == (2, attn.heads, image_tokens + text_tokens, head_dim)
        image_rows = slice(text_tokens, None) if family == "flux" else slice(0, image_tokens)
        assert torch.equal(image.records[(name, 500)]["key"], record["key"][:, :, image_rows])
        if site.kind == "joint":
            text_rows = slice(0, text_tokens) if family == "flux" else slice(image_tokens, None)
            assert torch.equal(text.records[(name, 500)]["value"], record["value"][:, :, text_rows])


class _SpyDispatch:
    """Wraps ``dispatch_attention_fn``: records backend and parallel config, runs locally."""

    def __init__(self, real) -> None:
        self.real, self.backends, self.configs = real, [], []

    def __call__(self, *args, backend=None, parallel_config=None, **kwargs):
        self.backends.append(backend)
        self.configs.append(parallel_config)
        return self.real(*args, backend=backend, parallel_config=None, **kwargs)


def test_flux_processor_dispatches_with_the_models_backend_and_parallel_config(models, monkeypatch):
    import editkit.attention.mmdit_processor as mmdit_processor

    model, inputs = models["flux"], _inputs("flux")
    spy = _SpyDispatch(mmdit_processor.dispatch_attention_fn)
    monkeypatch.setattr(mmdit_processor, "dispatch_attention_fn", spy)
    active = _AttentionBackendRegistry._active_backend
    try:
        model.set_attention_backend("_native_math")
        reference = _run(model, inputs)
        marker = object()  # stands for a ParallelConfig set by enable_parallelism
        model.single_transformer_blocks[0].attn.processor._parallel_config = marker
        with attach(model, AttentionController()):
            controlled = _run(model, inputs)
            model.set_attention_backend("native")  # while attached: reaches the stock processors too
        assert torch.equal(reference, controlled)
        assert spy.backends == [AttentionBackendName._NATIVE_MATH] * 4
        assert spy.configs == [None, None, marker, None]
        assert {p._attention_backend for p in model.attn_processors.values()} == {AttentionBackendName.NATIVE}
    finally:
        model.single_transformer_blocks[0].attn.processor._parallel_config = None
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)


class _SoftTokens(AttentionController):
    """Inserts two tokens after the first text token of every joint site and asks for maps."""

    def __init__(self) -> None:
        super().__init__()
        self.text_lengths, self.map_widths = set(), set()

    def applies_to(self, site):
        return site.kind == "joint"

    def wants_probs(self, site):
        return True

    def inserted_tokens(self, site):
        return (1, 2)

    def on_context(self, site, context):
        tokens = torch.ones(context.shape[0], 2, context.shape[2])
        return torch.cat([context[:, :1], tokens, context[:, 1:]], dim=1)

    def on_qkv(self, site, query, key, value):
        self.text_lengths.add(site.layout.text_tokens)
        return query, key, value

    def on_probs(self, site, probs, queries):
        self.map_widths.add(probs.shape[-1])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_inserted_text_tokens_reach_attention_and_leave_maps_and_streams(models, family):
    model, inputs = models[family], _inputs(family)
    reference = _run(model, inputs)
    with attach(model, _SoftTokens()) as tokens:
        output = _run(model, inputs)
    assert tokens.text_lengths == {TEXT_TOKENS + 2}  # the kernel saw the inserted tokens
    assert tokens.map_widths == {TEXT_TOKENS}  # prompt token indices never shift
    assert output.shape == reference.shape and not torch.allclose(output, reference)


def test_single_stream_sites_refuse_insertions_and_need_the_call(models):
    model, inputs = models["flux"], _inputs("flux")

    class Everywhere(_SoftTokens):
        def applies_to(self, site):
            return True

    with (
        pytest.raises(ValueError, match=r"single-stream site single_transformer_blocks\.0\.attn"),
        attach(model, Everywhere()),
    ):
        _run(model, inputs)
    attn = model.single_transformer_blocks[0].attn
    with attach(model, AttentionController()), pytest.raises(RuntimeError, match="text length"):
        attn(torch.randn(1, 29, attn.query_dim))  # outside a transformer call: no text length


@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_softmax_scale_reaches_the_kernel(models, family):
    model, inputs = models[family], _inputs(family)
    head_dim = 8 if family == "sd35" else 16

    class Scale(AttentionController):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def softmax_scale(self, site, default):
            return self.factor / math.sqrt(head_dim)

    reference = _run(model, inputs)
    with attach(model, Scale(1.0)):
        default_scale = _run(model, inputs)
    with attach(model, compose(Scale(3.0))):
        sharper = _run(model, inputs)
    torch.testing.assert_close(default_scale, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sharper, reference, atol=1e-3)


@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_pass_through_dispatches_the_same_aten_operations(models, family):
    model, inputs = models[family], _inputs(family)
    stock, editkit = OpCounter(), OpCounter()
    with stock:
        _run(model, inputs)
    with attach(model, AttentionController()):
        _run(model, inputs)  # FLUX: the grid is read from img_ids once per ids tensor (once per generation)
        with editkit:
            _run(model, inputs)
    assert stock.count > 0 and editkit.by_op == stock.by_op


def test_fused_flux_projections_stay_bit_exact():
    model, inputs = _flux(), _inputs("flux")
    model.fuse_qkv_projections()
    assert model.transformer_blocks[0].attn.fused_projections
    reference = _run(model, inputs)
    with attach(model, AttentionController()):
        controlled = _run(model, inputs)
    assert torch.equal(reference, controlled)


def test_nested_attach_composes_and_restores_layer_by_layer(models):
    model, inputs = models["sd35"], _inputs("sd35")
    stock = dict(model.attn_processors)
    outer, inner = _SiteLog(), SelfAttentionOutputRecorder(sites="transformer_blocks.1")
    with attach(model, outer):
        attached = dict(model.attn_processors)
        with attach(model, inner):
            _run(model, inputs)
        assert all(model.attn_processors[name] is processor for name, processor in attached.items())
    assert all(model.attn_processors[name] is processor for name, processor in stock.items())
    assert set(outer.seen) == {s.name for s in attention_sites(model)}
    assert set(inner.outputs) == {"transformer_blocks.1.attn"}


def test_undeclared_text_insertions_are_refused(models):
    class Undeclared(_SoftTokens):
        def inserted_tokens(self, site):
            return None

    with pytest.raises(ValueError, match="changed the text length by 2 tokens"), attach(models["sd3"], Undeclared()):
        _run(models["sd3"], _inputs("sd3"))
