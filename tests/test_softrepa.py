"""SoftREPA mechanics: loss numerics, token insertion, strength, time buckets, the token file format."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F

from editkit.attention import AttentionController, CrossAttentionMapStore, attach, attention_sites
from editkit.conditioning import TextConditioning
from editkit.errors import InputError, ModelLoadError
from editkit.softrepa import (
    ContrastiveLossConfig,
    SoftTokenController,
    SoftTokens,
    contrastive_loss,
    default_sites,
    load_soft_tokens,
    pair_errors,
    read_soft_tokens,
    save_soft_tokens,
    use_soft_tokens,
)
from editkit.softrepa.loss import row_chunks
from editkit.softrepa.train import _Trainer

M = 3


class ContextRecorder(AttentionController):
    """Records the context every cross-attention site receives (after earlier controllers)."""

    def __init__(self):
        super().__init__()
        self.contexts = {}

    def applies_to(self, site):
        return site.is_cross

    def on_context(self, site, context):
        self.contexts[site.name] = context.detach().clone()
        return context


def _soft(unet, time_buckets=0, seed=1):
    tokens = torch.randn(M, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(seed))
    return SoftTokens(tokens, default_sites(unet), time_buckets=time_buckets, base_model="tiny")


def _unet_inputs(unet, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 16, 16, generator=generator)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    return sample, context


# -- the objective --------------------------------------------------------------------------
def _stub_predict(sample, context, added):
    """A deterministic denoiser whose output depends on both the image and the caption."""
    return torch.tanh(sample * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + context[:, :4, 0].view(-1, 4, 1, 1))


@pytest.mark.parametrize("form", ["exp", "linear"])
@pytest.mark.parametrize("direction", ["rows", "columns", "both"])
def test_loss_equals_direct_computation_from_the_error_matrix(form, direction):
    torch.manual_seed(3)
    batch, extra = 3, 2
    noisy, target = torch.randn(batch, 4, 5, 5), torch.randn(batch, 4, 5, 5)
    embeds = torch.randn(batch + extra, 7, 6)
    errors = pair_errors(_stub_predict, noisy, target, embeds, slice(0, batch))
    direct = torch.tensor(
        [
            [
                ((target[i] - _stub_predict(noisy[i : i + 1], embeds[j : j + 1], None)[0]) ** 2).mean()
                for j in range(batch + extra)
            ]
            for i in range(batch)
        ]
    )
    torch.testing.assert_close(errors, direct)
    config = ContrastiveLossConfig(logit_form=form, tau=0.5, scale=3.0, direction=direction, denoise_weight=2.5)
    logits = -direct / 0.5 if form == "linear" else 3.0 * torch.exp(-direct / 0.5)
    labels = torch.arange(batch)
    rows = F.cross_entropy(logits, labels)
    columns = F.cross_entropy(logits[:, :batch].T, labels)
    contrast = {"rows": rows, "columns": columns, "both": (rows + columns) / 2}[direction]
    expected = contrast + 2.5 * direct.diagonal().mean()
    torch.testing.assert_close(contrastive_loss(errors, config), expected)


def test_row_chunks_sum_to_the_full_loss():
    torch.manual_seed(4)
    errors = torch.rand(5, 7)
    config = ContrastiveLossConfig()
    chunks = row_chunks(5, 2)
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 4), (4, 5)]
    total = sum(contrastive_loss(errors[c], config, c, 5) for c in chunks)
    torch.testing.assert_close(total, contrastive_loss(errors, config))


def test_chunked_column_loss_has_the_same_gradient_as_the_whole_matrix():
    torch.manual_seed(5)
    noisy, target = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    weight = torch.nn.Parameter(torch.randn(6))

    def predict(sample, context, added):
        return _stub_predict(sample, context * weight, added)

    columns = TextConditioning(torch.randn(4, 5, 6))
    grads = []
    for chunk in (None, 1):
        weight.grad = None
        loss_config = ContrastiveLossConfig(direction="both")
        fake = types.SimpleNamespace(
            config=types.SimpleNamespace(row_chunk=chunk, loss=loss_config),
            accelerator=types.SimpleNamespace(backward=lambda loss: loss.backward()),
        )
        value = _Trainer.loss_and_backward(fake, predict, noisy, target, columns)
        grads.append((value, weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


def test_config_rejects_unknown_forms():
    with pytest.raises(ValueError, match="logit_form"):
        ContrastiveLossConfig(logit_form="softmax")
    with pytest.raises(ValueError, match="direction"):
        ContrastiveLossConfig(direction="diagonal")


# -- insertion -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tokens_follow_start_of_text_at_target_sites_only_in_both_cfg_branches(family, sd15_pipe, sdxl_pipe):
    pipe = sd15_pipe if family == "sd15" else sdxl_pipe
    unet = pipe.unet
    soft = _soft(unet)
    sample, context = _unet_inputs(unet)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 16), "time_ids": torch.zeros(2, 6)}
    recorder = ContextRecorder()
    controller = SoftTokenController(soft)
    with torch.no_grad(), attach(unet, [controller, recorder]) as composed:
        composed.batch_roles = ("uncond", "cond")
        unet(sample, 10, encoder_hidden_states=context, **kwargs)
    targets = set(soft.sites)
    cross = {s.name for s in attention_sites(unet) if s.is_cross}
    assert targets and targets < cross and set(recorder.contexts) == cross
    for name, seen in recorder.contexts.items():
        if name in targets:
            assert seen.shape == (2, 77 + M, context.shape[-1])
            for row in range(2):  # uncond and cond
                torch.testing.assert_close(seen[row, 1 : 1 + M], soft.tokens.detach(), rtol=0, atol=0)
            torch.testing.assert_close(seen[:, :1], context[:, :1], rtol=0, atol=0)
            torch.testing.assert_close(seen[:, 1 + M :], context[:, 1:], rtol=0, atol=0)
        else:
            torch.testing.assert_close(seen, context, rtol=0, atol=0)
    blocks = {"sd15": {"down"}, "sdxl": {"down", "mid"}}[family]
    assert {s.block for s in attention_sites(unet) if s.name in targets} == blocks


def test_strength_zero_equals_no_tokens_and_strength_scales(sd15_pipe):
    unet = sd15_pipe.unet
    soft = _soft(unet)
    sample, context = _unet_inputs(unet)
    with torch.no_grad():
        plain = unet(sample, 10, encoder_hidden_states=context).sample
        outputs = {}
        for strength in (0.0, 1.0):
            with attach(unet, SoftTokenController(soft, strength=strength)):
                outputs[strength] = unet(sample, 10, encoder_hidden_states=context).sample
    assert torch.equal(outputs[0.0], plain)
    assert not torch.allclose(outputs[1.0], plain)
    recorder = ContextRecorder()
    with torch.no_grad(), attach(unet, [SoftTokenController(soft, strength=0.5), recorder]):
        unet(sample, 10, encoder_hidden_states=context)
    torch.testing.assert_close(recorder.contexts[soft.sites[0]][0, 1 : 1 + M], 0.5 * soft.tokens.detach())
    assert SoftTokenController(soft, strength=0.0).inserted_tokens(attention_sites(unet)[1]) is None


def test_cross_attention_maps_keep_prompt_token_indices(sd15_pipe):
    unet = sd15_pipe.unet
    soft = _soft(unet)
    controller = SoftTokenController(soft)
    site = next(s for s in attention_sites(unet) if s.name == soft.sites[0])
    other = next(s for s in attention_sites(unet) if s.is_cross and s.name not in soft.sites)
    assert controller.inserted_tokens(site) == (1, M)
    assert controller.inserted_tokens(other) is None
    sample, context = _unet_inputs(unet)
    store = CrossAttentionMapStore(grids=None, role="cond")
    with torch.no_grad(), attach(unet, [controller, store]) as composed:
        composed.batch_roles = ("uncond", "cond")
        unet(sample, 10, encoder_hidden_states=context)
    target, untouched = store.maps[soft.sites[0]], store.maps[other.name]
    assert target.shape[-1] == 77 and untouched.shape[-1] == 77
    torch.testing.assert_close(untouched.sum(-1), torch.ones_like(untouched[..., 0]))
    assert (target.sum(-1) < 1 - 1e-4).all()  # the soft tokens' share of attention is dropped, not shifted


def test_time_buckets_need_begin_step_and_add_the_bucket_embedding(sd15_pipe):
    unet = sd15_pipe.unet
    soft = _soft(unet, time_buckets=100)
    with torch.no_grad():
        soft.time_embedding.copy_(torch.randn_like(soft.time_embedding))
    sample, context = _unet_inputs(unet)
    controller = SoftTokenController(soft)
    with torch.no_grad(), attach(unet, controller), pytest.raises(RuntimeError, match="begin_step"):
        unet(sample, 10, encoder_hidden_states=context)
    recorder = ContextRecorder()
    with torch.no_grad(), attach(unet, [controller, recorder]) as composed:
        composed.begin_step(0, torch.tensor(537))
        unet(sample, 537, encoder_hidden_states=context)
    expected = soft.tokens + soft.time_embedding[53]
    torch.testing.assert_close(recorder.contexts[soft.sites[0]][1, 1 : 1 + M], expected.detach())
    assert soft.bucket(999) == 99 and soft.bucket(0) == 0


def test_use_soft_tokens_runs_plain_diffusers_pipelines_with_time_tokens(sd15_pipe):
    unet = sd15_pipe.unet
    before = dict(unet.attn_processors)
    soft = _soft(unet, time_buckets=10)
    controller = SoftTokenController(soft)
    seen = []
    original = controller.on_context

    def on_context(site, context):
        seen.append((int(controller._step_bucket), context.shape[0]))  # the bucket the hook set
        return original(site, context)

    controller.on_context = on_context
    with use_soft_tokens(unet, controller):
        sd15_pipe("a cat", num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="latent")
    buckets = sorted({b for b, _ in seen}, reverse=True)
    assert buckets == [soft.bucket(t) for t in sd15_pipe.scheduler.timesteps] and len(buckets) == 2
    assert {batch for _, batch in seen} == {2}  # both CFG branches in one batch
    assert all(unet.attn_processors[k] is v for k, v in before.items())


# -- the file format -------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, sd15_pipe):
    soft = _soft(sd15_pipe.unet, time_buckets=4)
    with torch.no_grad():
        soft.time_embedding.normal_()
    path = save_soft_tokens(soft, tmp_path / "tokens.safetensors")
    loaded = read_soft_tokens(path)
    assert torch.equal(loaded.tokens, soft.tokens) and torch.equal(loaded.time_embedding, soft.time_embedding)
    assert loaded.sites == soft.sites and loaded.time_buckets == 4 and loaded.base_model == "tiny"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as reader:
        metadata = reader.metadata()
    assert metadata["format_version"] == "2" and metadata["num_tokens"] == str(M)
    assert metadata["time_layout"] == "shared" and loaded.time_embedding.shape == (4, 16)
    assert metadata["token_width"] == "16" and json.loads(metadata["sites"]) == soft.sites
    controller = load_soft_tokens(path, unet=sd15_pipe.unet, strength=0.7)
    assert controller.strength == 0.7 and not controller.soft_tokens.tokens.requires_grad
    with pytest.raises(InputError, match="exists"):
        save_soft_tokens(soft, path)


def test_files_for_another_model_are_refused(tmp_path, sd15_pipe, sdxl_pipe):
    path = save_soft_tokens(_soft(sd15_pipe.unet), tmp_path / "sd15.safetensors")
    with pytest.raises(ModelLoadError, match=r"width 16 .*cross_attention_dim 32"):
        load_soft_tokens(path, unet=sdxl_pipe.unet)
    wrong_sites = SoftTokens(torch.zeros(2, 32), default_sites(sd15_pipe.unet), base_model="sd15")
    path = save_soft_tokens(wrong_sites, tmp_path / "sites.safetensors")
    with pytest.raises(ModelLoadError, match=r"site.*do not exist"):
        load_soft_tokens(path, unet=sdxl_pipe.unet)


def test_pickles_and_foreign_files_are_refused(tmp_path, sd15_pipe):
    soft = _soft(sd15_pipe.unet)
    for name in ("tokens.pt", "disguised.safetensors"):
        torch.save({"tokens": soft.tokens.detach()}, tmp_path / name)
        with pytest.raises(ModelLoadError, match="pickle"):
            load_soft_tokens(tmp_path / name, unet=sd15_pipe.unet)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelLoadError, match="not an editkit SoftREPA token file"):
        load_soft_tokens(tmp_path / "other.safetensors", unet=sd15_pipe.unet)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_soft_tokens(tmp_path / "junk.safetensors", unet=sd15_pipe.unet)
    with pytest.raises(InputError, match="not found"):
        load_soft_tokens(tmp_path / "missing.safetensors", unet=sd15_pipe.unet)
