"""Compose on MM-DiT (SD3, SD3.5, FLUX.1): the loop against diffusers' own pipelines, maps against
attention computed by hand from the stock processors' math, token positions, early exit, FLUX's
guidance and schnell's steps, family checks; the CLI and an app handler end to end on tiny folders."""

from __future__ import annotations

import json

import pytest
import torch

from editkit.errors import InputError
from editkit.testing_mmdit import tiny_flux_pipeline, tiny_sd3_pipeline

WORDS = ("red", "car", "blue", "bird")
PROMPT = "a red car on the left of a blue bird"
SMALL = {"height": 32, "width": 32, "num_inference_steps": 4, "output_type": "pt"}


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stock(kind: str):
    if kind == "flux":
        return tiny_flux_pipeline(words=WORDS)
    if kind == "schnell":
        return tiny_flux_pipeline(words=WORDS, guidance_embeds=False)
    return tiny_sd3_pipeline(words=WORDS, sd35=kind == "sd35")


def _compose(stock):
    from pipelines.flow_compose import FluxComposePipeline, SD3ComposePipeline

    cls = FluxComposePipeline if "Flux" in type(stock).__name__ else SD3ComposePipeline
    pipe = cls(**stock.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["sd3", "sd35", "flux", "schnell"])
def pair(request):
    stock = _stock(request.param)
    return request.param, stock, _compose(stock)


def test_unguided_run_is_diffusers_pipeline_and_guidance_is_deterministic(pair):
    kind, stock, pipe = pair
    guidance = {"sd3": 7.0, "sd35": 7.0, "flux": 3.5, "schnell": 0.0}[kind]
    reference = stock(PROMPT, generator=_seeded(), guidance_scale=guidance, **SMALL).images
    plain = pipe(PROMPT, generator=_seeded(), max_iter_to_alter=0, refine=False, **SMALL).images
    torch.testing.assert_close(plain, reference, rtol=0, atol=1e-6)  # diffusers' defaults and loop, exactly
    guided = pipe(PROMPT, generator=_seeded(), refine=False, **SMALL).images
    again = pipe(PROMPT, generator=_seeded(), refine=False, **SMALL).images
    assert torch.equal(guided, again)
    assert (guided - plain).abs().max() > 1e-3  # the guided latent updates changed the image


# -- maps against the stock processors' math ---------------------------------------------------------
def _record_attention_inputs(transformer, names):
    """Forward pre-hooks recording each named attention layer's inputs (stock processors, no editkit)."""
    seen, handles = {}, []
    for name in names:
        module = transformer.get_submodule(name)
        hook = lambda m, args, kwargs, name=name: seen.__setitem__(name, kwargs)  # noqa: E731
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def _heads(attn, tensor):
    return tensor.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (batch, heads, tokens, head_dim)


def _sd3_reference(attn, hidden_states, encoder_hidden_states, **_):
    """JointAttnProcessor2_0's math: joint softmax(QK^T / sqrt(d)) over [image; text] keys, image rows x text keys."""
    query, key = _heads(attn, attn.to_q(hidden_states)), _heads(attn, attn.to_k(hidden_states))
    text_key = _heads(attn, attn.add_k_proj(encoder_hidden_states))
    if attn.norm_q is not None:
        query, key, text_key = attn.norm_q(query), attn.norm_k(key), attn.norm_added_k(text_key)
    keys = torch.cat([key, text_key], dim=2)
    probs = torch.softmax(query @ keys.transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1)
    return probs[..., hidden_states.shape[1] :].mean(dim=1)  # (batch, image tokens, text tokens)


def _flux_reference(attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, text_tokens=None, **_):
    """FluxAttnProcessor's math: [text; image] (double stream) with rotary q/k, image rows x text keys."""
    from diffusers.models.embeddings import apply_rotary_emb

    def project(linear, norm, states):
        return norm(linear(states).unflatten(-1, (attn.heads, -1)))  # (batch, tokens, heads, head_dim)

    query, key = project(attn.to_q, attn.norm_q, hidden_states), project(attn.to_k, attn.norm_k, hidden_states)
    if encoder_hidden_states is not None:
        text_tokens = encoder_hidden_states.shape[1]
        query = torch.cat([project(attn.add_q_proj, attn.norm_added_q, encoder_hidden_states), query], dim=1)
        key = torch.cat([project(attn.add_k_proj, attn.norm_added_k, encoder_hidden_states), key], dim=1)
    query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1).transpose(1, 2)
    key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1).transpose(1, 2)
    probs = torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1)
    return probs[..., text_tokens:, :text_tokens].mean(dim=1)


@pytest.mark.parametrize("kind", ["sd35", "flux"])
def test_maps_are_the_joint_attention_image_rows_over_text_keys(kind):
    from editkit.attention import attach
    from editkit.backbones import backbone_for
    from editkit.flow_compose_maps import FlowMapStore, default_map_sites, map_sites_for
    from editkit.refine import MapsCaptured

    stock = _stock(kind)
    transformer = stock.transformer
    prefixes = ["transformer_blocks"] + (["single_transformer_blocks"] if kind == "flux" else [])
    sites = map_sites_for(transformer, prefixes)  # every text-attending site, in execution order
    backbone = backbone_for(stock)
    text = backbone.encode_text([PROMPT])
    latents = torch.randn(1, *((4, 4, 4) if kind == "sd35" else (1, 8, 8)), generator=_seeded(3))
    timestep = torch.tensor(700.0)
    seen, handles = _record_attention_inputs(transformer, sites)
    with torch.no_grad():
        backbone.denoise(latents, timestep, text)
        for handle in handles:
            handle.remove()
        reference_fn = _sd3_reference if kind == "sd35" else _flux_reference
        text_tokens = text.prompt_embeds.shape[1]
        references = [reference_fn(transformer.get_submodule(n), **seen[n], text_tokens=text_tokens) for n in sites]
        reference = torch.stack(references).mean(dim=0)[0]  # (image tokens, text tokens)

        store = FlowMapStore(sites)
        with attach(transformer, store):
            store.active = True
            backbone.denoise(latents, timestep, text)
            maps = store.aggregate()[0]  # (h, w, text tokens)
            torch.testing.assert_close(maps.flatten(0, 1), reference, rtol=1e-4, atol=1e-6)
            store.clear()
            store.early_exit = True
            with pytest.raises(MapsCaptured):  # the pass stops at the last map site, with the same maps
                backbone.denoise(latents, timestep, text)
            torch.testing.assert_close(store.aggregate()[0], maps)
    # the middle half of the joint / double-stream blocks (sd35: block 1 of 0-1; flux: its one double block)
    expected = "transformer_blocks.1.attn" if kind == "sd35" else "transformer_blocks.0.attn"
    assert default_map_sites(transformer) == [expected]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_constraint_tokens_sit_at_the_words_text_positions(kind):
    from editkit.constraints import parse_prompt
    from editkit.flow_compose_maps import align_prompt, text_streams

    stock = _stock(kind)
    family = "flux" if kind == "flux" else "sd3"
    streams = text_streams(stock, family, 64)
    tokens = align_prompt(parse_prompt(PROMPT), streams, family)
    clip = stock.tokenizer.convert_ids_to_tokens(stock.tokenizer(PROMPT, padding="max_length").input_ids)
    t5_tokenizer = stock.tokenizer_3 if family == "sd3" else stock.tokenizer_2
    t5 = t5_tokenizer.convert_ids_to_tokens(t5_tokenizer(PROMPT).input_ids)
    clip_length = len(clip) if family == "sd3" else 0
    for name, entity in zip(tokens.aligned.names, tokens.aligned.entities, strict=True):
        where = [tokens.positions[k - 1] for k in entity]
        pieces = [clip[p] if p < clip_length else t5[p - clip_length] for p in where]
        expected = [f"{name}</w>", f"▁{name}"] if family == "sd3" else [f"▁{name}"]
        assert pieces == expected
    full = tokens.full_aligned.entities[0]  # the paper's view: text positions (+1 on FLUX, for its start column)
    assert full == [tokens.positions[k - 1] + (family == "flux") for k in tokens.aligned.entities[0]]
    if family == "sd3":  # map_text_encoders=["clip"]: the CLIP tokens alone
        only_clip = align_prompt(parse_prompt(PROMPT), text_streams(stock, family, 64, ["clip"]), family)
        assert all(len(entity) == 1 for entity in only_clip.aligned.entities)
        # 16 T5 tokens end before "bird" (character pieces): its T5 token is cut, its CLIP token stays
        short = align_prompt(parse_prompt(PROMPT), text_streams(stock, family, 16), family)
        assert [len(entity) for entity in short.aligned.entities] == [2, 1]


def test_guided_pass_stops_after_the_last_map_block_and_flux_takes_its_guidance():
    sd35 = _compose(_stock("sd35"))  # two joint blocks
    calls = {0: 0, 1: 0}
    handles = [sd35.transformer.transformer_blocks[i].register_forward_pre_hook(
        lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in (0, 1)]  # fmt: skip
    sd35(PROMPT, generator=_seeded(), max_iter_to_alter=2, refine=False, map_sites=["transformer_blocks.0"], **SMALL)
    for handle in handles:
        handle.remove()
    assert calls == {0: 4 + 2, 1: 4}  # 4 CFG steps; the 2 guided passes stop inside block 0

    for guidance_embeds, steps, expected in ((True, 28, [2.5]), (False, 4, None)):
        flux = _compose(tiny_flux_pipeline(words=WORDS, guidance_embeds=guidance_embeds))
        seen: list = []

        def record(module, args, kwargs, seen=seen):
            seen.append(None if kwargs["guidance"] is None else kwargs["guidance"].tolist())

        hook = flux.transformer.register_forward_pre_hook(record, with_kwargs=True)
        options = {**SMALL, "num_inference_steps": None}
        flux(PROMPT, generator=_seeded(), refine=False, guidance_scale=2.5 if guidance_embeds else None, **options)
        hook.remove()
        assert len(seen) == steps + steps // 2  # FLUX.1-dev 28 steps, schnell 4; half of them guided, no CFG
        assert all(value == expected for value in seen)  # guided passes take the distilled guidance too


def test_paper_preset_and_noise_refinement_run_on_flow_models():
    from editkit.verifiers import AttentionVerifier

    pipe = _compose(_stock("sd3"))
    forced = AttentionVerifier(peak_threshold=2.0)  # fails every entity: stage 2 always runs
    out = pipe(PROMPT, generator=_seeded(), loss_preset="paper", verifier=forced, **SMALL)
    assert out.chosen in ("stage1", "refined") and out.refined_noise is not None
    assert not torch.equal(out.refined_noise, out.initial_noise)
    assert {s.kind for s in out.report_before} == {"entity", "attribute", "relation"}
    initno = pipe(PROMPT, generator=_seeded(), noise_refiner="initno", verifier=forced, initno_steps=2, **SMALL)
    assert initno.refined_noise is not None and torch.isfinite(initno.refined_noise).all()


def test_guided_and_refinement_passes_leave_the_weights_out_of_autograd():
    """A transformer loaded for inference has requires_grad=True weights: the guidance graphs (stage 1 and 2)
    must not include them, and each flag comes back as it was."""
    from editkit.verifiers import AttentionVerifier

    pipe = _compose(_stock("sd3"))
    transformer = pipe.transformer
    transformer.requires_grad_(True)
    transformer.pos_embed.proj.weight.requires_grad_(False)  # one odd flag, to check each is restored
    during: list[tuple[bool, bool]] = []

    def record(module, args):
        during.append((torch.is_grad_enabled(), any(p.requires_grad for p in module.parameters())))

    handle = transformer.register_forward_pre_hook(record)
    try:
        forced = AttentionVerifier(peak_threshold=2.0)  # fails every entity: stage 2 runs too
        out = pipe(PROMPT, generator=_seeded(), verifier=forced, max_iter_to_alter=2, **SMALL)
    finally:
        handle.remove()
    assert out.refined_noise is not None
    assert sum(grad for grad, _ in during) >= 5  # 2 guided passes per stage-1 run, and the refinement's
    assert not any(weights for _, weights in during)
    assert all(p.grad is None for p in transformer.parameters())
    assert not transformer.pos_embed.proj.weight.requires_grad and transformer.proj_out.weight.requires_grad


def test_noise_refinement_rounds_chain_on_flow_models(monkeypatch):
    import editkit.flow_compose as module
    from editkit.verifiers import AttentionVerifier

    pipe = _compose(_stock("sd3"))
    refined_from, original = [], module.single_step_refine

    def recording(noise, faulty, loss_fn, **kwargs):
        refined_from.append(noise.clone())
        return original(noise, faulty, loss_fn, **kwargs)

    monkeypatch.setattr(module, "single_step_refine", recording)
    forced = AttentionVerifier(peak_threshold=2.0)  # fails every entity: every round runs
    out = pipe(PROMPT, generator=_seeded(), verifier=forced, noise_refinement_rounds=2, **SMALL)
    assert len(refined_from) == 2 and torch.equal(refined_from[0], out.initial_noise.float())
    assert not torch.equal(refined_from[1], refined_from[0])  # round 2 starts from round 1's noise
    one = pipe(PROMPT, generator=_seeded(), verifier=forced, **SMALL)
    assert torch.allclose(refined_from[1], one.refined_noise.float())  # ... which is what one round returns
    with pytest.raises(InputError, match="noise_refinement_rounds"):
        pipe(PROMPT, generator=_seeded(), noise_refinement_rounds=0, **SMALL)


def test_bad_inputs_are_refused_with_the_option_named():
    from editkit.tasks.compose import ComposeOptions, check_family_options
    from editkit.tasks.options import OptionError

    sd3 = _compose(_stock("sd3"))
    with pytest.raises(InputError, match="UNet attention site name"):
        sd3(PROMPT, map_sites=["up_blocks.1"], **SMALL)
    with pytest.raises(InputError, match=r"map_sites.*matches no"):
        sd3(PROMPT, map_sites=["transformer_blocks.9"], **SMALL)
    with pytest.raises(InputError, match="holds only clip"):
        sd3(PROMPT, map_text_encoders=["t5"], max_sequence_length=0, **SMALL)
    with pytest.raises(InputError, match="negative_prompt"):
        _compose(_stock("flux"))(PROMPT, negative_prompt="blurry", **SMALL)
    with pytest.raises(OptionError, match=r"attention_blocks is a UNet.*sd3"):
        check_family_options(ComposeOptions(attention_blocks=("down",)), "sd3")
    with pytest.raises(OptionError, match=r"map_sites is an MM-DiT.*sd model"):
        check_family_options(ComposeOptions(map_sites=("transformer_blocks.0",)), "sd")


# -- front ends ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("flow-compose") / "sd3"
    tiny_sd3_pipeline(path=path, words=WORDS)
    return path


def test_cli_runs_compose_on_an_sd3_folder(sd3_dir, tmp_path, capsys):
    from PIL import Image

    from editkit.cli import main

    output = tmp_path / "out.png"
    assert main(["compose", PROMPT, "--model", str(sd3_dir), "-o", str(output), "--steps", "2", "--size", "32"]) == 0
    assert "relation  car left bird" in capsys.readouterr().out and output.is_file()
    used = json.loads(Image.open(output).text["editkit"])["used"]
    assert used["sampler"] == "flow-match Euler" and used["guidance_scale"] == 7.0  # SD3's default CFG scale
    assert used["map_sites"] == ["transformer_blocks.0.attn"]
    refused = ["compose", PROMPT, "--model", str(sd3_dir), "-o", str(tmp_path / "x.png"), "--attention-blocks", "down"]
    assert main(refused) == 2
    error = capsys.readouterr().err
    assert "--attention-blocks is a UNet" in error and "sd3" in error and not (tmp_path / "x.png").exists()


def test_app_compose_handler_on_an_sd3_folder(sd3_dir, tmp_path):
    from editkit.app.handlers import Handlers
    from editkit.app.models import ModelManager

    handlers = Handlers(ModelManager(sd3_dir, device="cpu"), tmp_path)
    image, path, _, report = handlers.compose("a red car and a blue bird", "", True, 2, 7.0, 0)
    assert image.size == (32, 32)  # the model's native side: sample_size 4 x VAE scale factor 8
    assert {row["constraint"] for row in report["before_refinement"]} >= {"car", "bird"}
    assert path is not None
