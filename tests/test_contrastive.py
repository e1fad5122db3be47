"""Contrastive editing: DDS gradient, PatchNCE, feature recording and ContrastiveEditPipeline mechanics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from editkit.attention import AttentionController, attach, attention_sites, select_sites
from editkit.conditioning import encode_text
from editkit.contrastive import (
    ContrastiveFeatureRecorder,
    contrastive_loss,
    dds_latent_gradient,
    patch_nce,
    patch_nce_loss,
    sample_locations,
    sample_noise,
    sample_timestep,
)
from editkit.errors import InputError
from editkit.image import pil_to_tensor
from editkit.inversion import encode_image_latents
from pipelines.contrastive_edit import ContrastiveEditPipeline


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))


@pytest.fixture
def edit_pipe(sd15_pipe):
    pipe = ContrastiveEditPipeline.from_pipe(sd15_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- PatchNCE -------------------------------------------------------------------------------------
def _reference_rows(source: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """CE over rows of S = f_src f_trg^T (source-anchored), written out element by element."""
    source, target = torch.nn.functional.normalize(source, dim=-1), torch.nn.functional.normalize(target, dim=-1)
    total = 0.0
    n = source.shape[0]
    for i in range(n):
        positive = float(source[i] @ target[i]) / tau
        negatives = [float(source[i] @ target[j]) / tau for j in range(n) if j != i] + [-10.0 / tau]
        total += -positive + math.log(math.exp(positive) + sum(math.exp(v) for v in negatives))
    return torch.tensor(total / n)


def test_patch_nce_directions_match_rows_and_columns():
    generator = torch.Generator().manual_seed(1)
    source = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    target = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    row = patch_nce_loss(source, target, direction="source", tau=0.5)
    column = patch_nce_loss(source, target, direction="target", tau=0.5)
    torch.testing.assert_close(row, _reference_rows(source, target, 0.5).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(column, _reference_rows(target, source, 0.5).float(), rtol=1e-5, atol=1e-5)
    assert not torch.isclose(row, column)
    torch.testing.assert_close(patch_nce_loss(source, target, direction="dual", tau=0.5), (row + column) / 2)


def test_identical_features_give_the_minimum_loss():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(32, 64, generator=generator)
    same = patch_nce_loss(features, features.clone())
    assert float(same) < 1e-3  # every positive at similarity 1, negatives near 0
    for scale in (0.05, 0.2, 1.0):
        perturbed = features + scale * torch.randn(32, 64, generator=generator)
        for direction in ("source", "target", "dual"):
            assert patch_nce_loss(features, perturbed, direction=direction) > patch_nce_loss(
                features, features, direction=direction
            )


@pytest.mark.parametrize("direction", ["source", "target", "dual"])
def test_patch_nce_gradient_matches_finite_differences(direction):
    generator = torch.Generator().manual_seed(3)
    source = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    def loss(s, t):
        s, t = torch.nn.functional.normalize(s, dim=-1), torch.nn.functional.normalize(t, dim=-1)
        if direction == "source":
            return patch_nce(s, t, tau=0.3)
        if direction == "target":
            return patch_nce(t, s, tau=0.3)
        return (patch_nce(s, t, tau=0.3) + patch_nce(t, s, tau=0.3)) / 2

    assert torch.autograd.gradcheck(loss, (source, target), eps=1e-6, atol=1e-5)
    # the public function (float32 inside) agrees with the double-precision reference
    torch.testing.assert_close(
        patch_nce_loss(source.detach(), target.detach(), direction=direction, tau=0.3).double(),
        loss(source, target).detach(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_patch_locations_come_from_the_generator():
    first = sample_locations(100, 10, torch.Generator().manual_seed(5))
    again = sample_locations(100, 10, torch.Generator().manual_seed(5))
    other = sample_locations(100, 10, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(set(first.tolist())) == 10
    allowed = torch.zeros(10, 10, dtype=torch.bool)
    allowed[2:4, 5:9] = True
    inside = sample_locations(100, 50, torch.Generator().manual_seed(5), allowed)
    assert len(inside) == 8 and all(allowed.flatten()[inside])


def test_contrastive_loss_sums_sites_and_scales_with_shared_locations():
    generator = torch.Generator().manual_seed(7)
    source = {"a": torch.randn(1, 16, 8, generator=generator), "b": torch.randn(1, 4, 8, generator=generator)}
    target = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in source.items()}
    grids = {"a": (4, 4), "b": (2, 2)}
    options = {"patch_sizes": (1, 2), "num_patches": 256, "direction": "source"}
    total = contrastive_loss(source, target, grids, generator=torch.Generator().manual_seed(0), **options)
    # all cells are used (num_patches >= cells), so the loss is the sum of full-grid PatchNCE terms
    expected = 0.0
    for site, (h, w) in grids.items():
        for p in (1, 2):
            s = torch.nn.functional.avg_pool2d(source[site].transpose(1, 2).reshape(1, 8, h, w), p).flatten(2)[0].T
            t = torch.nn.functional.avg_pool2d(target[site].transpose(1, 2).reshape(1, 8, h, w), p).flatten(2)[0].T
            if s.shape[0] >= 2:
                expected = expected + patch_nce_loss(s, t, direction="source")
    torch.testing.assert_close(total, expected)
    # on a smaller sample of locations, identical features still beat perturbed ones
    same = contrastive_loss(source, source, grids, generator=torch.Generator().manual_seed(1), num_patches=3)
    perturbed = contrastive_loss(source, target, grids, generator=torch.Generator().manual_seed(1), num_patches=3)
    assert same < perturbed


def _per_site_reference(source, target, grids, *, direction, generators, region=None, num_patches=5, tau=0.07):
    """The contrastive loss as a plain loop (CUT eq. 2 per site, patch size and item), from the paper.

    Per sorted site and patch size p (1, 2): average-pool p x p, draw the locations with
    ``torch.randperm`` of the cells (of the cells the region covers), one draw per generator, the
    same for source and target; L2-normalise; logits [a_i . f_i, a_i . f_j (j != i), -10] / tau;
    cross-entropy with the positive first, mean over the patches; rows of S for "source", columns
    for "target", their mean for "dual"; mean over items, summed over sites and patch sizes.
    """
    functional = torch.nn.functional
    total = 0.0
    for site in sorted(target):
        (h, w), (batch, _, channels) = grids[site], target[site].shape
        for p in (1, 2):
            if min(h, w) < p or (h // p) * (w // p) < 2:  # no whole patch, or no negative: skipped
                continue
            maps = [
                functional.avg_pool2d(f[site].transpose(1, 2).reshape(batch, channels, h, w), p)
                for f in (source, target)
            ]
            cells = torch.arange(maps[0].shape[-2] * maps[0].shape[-1])
            if region is not None:
                covered = functional.adaptive_avg_pool2d(region.float().amax(0, keepdim=True), (h, w))
                covered = functional.avg_pool2d(covered, p)[0, 0].flatten() > 0
                cells = cells[covered] if covered.sum() >= 2 else cells
            drawn = [cells[torch.randperm(len(cells), generator=g)[:num_patches]] for g in generators]
            drawn = drawn if len(drawn) == batch else drawn * batch
            items = []
            for item in range(batch):
                a, f = (functional.normalize(m[item].flatten(1)[:, drawn[item]].T, dim=-1) for m in maps)
                rows, columns = [], []
                for anchor, other, out in ((a, f, rows), (f, a, columns)):
                    for i in range(len(anchor)):
                        negatives = [
                            anchor[i] @ other[j] if j != i else torch.tensor(-10.0) for j in range(len(anchor))
                        ]
                        logits = torch.stack([anchor[i] @ other[i], *negatives]) / tau
                        out.append(torch.logsumexp(logits, 0) - logits[0])
                rows, columns = torch.stack(rows).mean(), torch.stack(columns).mean()
                items.append({"source": rows, "target": columns, "dual": (rows + columns) / 2}[direction])
            total = total + torch.stack(items).mean()
    return total


@pytest.mark.parametrize("direction", ["source", "target", "dual"])
@pytest.mark.parametrize("case", ["shared draw", "one generator per item", "region"])
def test_batched_loss_equals_the_per_site_reference(direction, case):
    """Sites of two widths and three grids (one too small for 2x2 patches), some grids with fewer cells than
    ``num_patches`` (padding inside the batch), two items: value and gradient equal the plain loop."""
    make = torch.Generator().manual_seed(3)
    grids = {"up.0": (4, 4), "up.1": (4, 4), "up.2": (2, 6), "up.3": (1, 3), "up.4": (6, 4)}
    widths = {"up.0": 8, "up.1": 8, "up.2": 8, "up.3": 4, "up.4": 4}
    source = {s: torch.randn(2, h * w, widths[s], generator=make) for s, (h, w) in grids.items()}
    target = {s: (v + 0.5 * torch.randn(v.shape, generator=make)).requires_grad_(True) for s, v in source.items()}
    seeds = [11, 12] if case == "one generator per item" else [11]
    region = None
    if case == "region":
        region = torch.zeros(2, 1, 16, 16)
        region[0, :, 2:9, 3:12] = 1
    options = {
        "direction": direction,
        "generators": [torch.Generator().manual_seed(s) for s in seeds],
        "region": region,
    }
    expected = _per_site_reference(source, target, grids, **options)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    generator = generators if case == "one generator per item" else generators[0]
    got = contrastive_loss(
        source, target, grids, direction=direction, num_patches=5, generator=generator, region=region
    )
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    expected_grads = torch.autograd.grad(expected, list(target.values()))
    got_grads = torch.autograd.grad(got, list(target.values()))
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# -- DDS helpers ----------------------------------------------------------------------------------
def test_dds_step_is_independent_of_resolution_and_masked():
    small, large = torch.ones(1, 4, 8, 8), torch.ones(1, 4, 64, 64)
    assert dds_latent_gradient(small).flatten()[0] == dds_latent_gradient(large).flatten()[0] == 2000 / 4096
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    masked = dds_latent_gradient(small, mask=mask)
    assert masked[..., 4:].abs().sum() == 0 and masked[..., :4].min() > 0


def test_timesteps_are_uniform_in_the_range():
    generator = torch.Generator().manual_seed(0)
    drawn = [sample_timestep(generator, min_timestep=50, max_timestep=60) for _ in range(200)]
    assert min(drawn) == 50 and max(drawn) == 59


# -- features on the shared layer ---------------------------------------------------------------
def test_recorder_keeps_the_role_rows_of_named_sites_per_branch(sd15_pipe):
    unet = sd15_pipe.unet
    sites = select_sites([s.name for s in attention_sites(unet)], "up_blocks.2", kind="self")
    recorder = ContrastiveFeatureRecorder("up_blocks.2")
    latents = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, 16)
    with attach(unet, recorder):
        recorder.branch = "source"
        recorder.batch_roles = ("uncond", "cond")
        unet(latents, 500, encoder_hidden_states=context)
        recorder.branch = None
        recorder.batch_roles = ("uncond",)
        unet(latents[:1], 500, encoder_hidden_states=context[:1])  # no cond rows: nothing recorded
        with torch.enable_grad():
            z = latents[1:].clone().requires_grad_(True)
            recorder.branch, recorder.batch_roles = "target", ("cond",)
            unet(z, 500, encoder_hidden_states=context[1:])
        recorder.branch = None
        reference = ContrastiveFeatureRecorder("up_blocks.2", role=None)
        reference.branch = "alone"
    with attach(unet, reference):
        unet(latents[1:], 500, encoder_hidden_states=context[1:])  # the cond row alone
    assert sorted(recorder.features["source"]) == sorted(sites) == sorted(recorder.features["target"])
    for site in sites:
        source, target = recorder.features["source"][site], recorder.features["target"][site]
        assert source.shape[0] == 1 and not source.requires_grad and target.requires_grad
        torch.testing.assert_close(source, reference.features["alone"][site], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(target.detach(), source, rtol=1e-4, atol=1e-5)
        assert recorder.grids[site][0] * recorder.grids[site][1] == source.shape[1]


def test_recorder_query_features_have_the_projection_width(sd15_pipe):
    recorder = ContrastiveFeatureRecorder("up_blocks.3", feature="query", role=None)
    recorder.branch = "source"
    with attach(sd15_pipe.unet, recorder):
        sd15_pipe.unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=torch.randn(1, 77, 16))
    for site, tensor in recorder.features["source"].items():
        module = sd15_pipe.unet.get_submodule(site)
        assert tensor.shape == (1, math.prod(recorder.grids[site]), module.to_q.out_features)


# -- the pipeline -----------------------------------------------------------------------------------
def _branch_eps(pipe, z_t, t, prompt, negative, guidance_scale):
    """Reference: each branch and CFG half as its own batch-1 UNet call, converted to eps."""
    alpha = pipe.scheduler.alphas_cumprod[t].float()
    outputs = []
    for text in (negative, prompt):
        embeds = encode_text(pipe, [text]).prompt_embeds
        outputs.append(pipe.unet(z_t, t, encoder_hidden_states=embeds, return_dict=False)[0])
    guided = outputs[0] + guidance_scale * (outputs[1] - outputs[0])
    if pipe.scheduler.config.prediction_type == "v_prediction":
        return alpha**0.5 * guided + (1 - alpha) ** 0.5 * z_t
    return guided


@pytest.mark.parametrize(
    ("prediction_type", "contrast"), [("epsilon", None), ("v_prediction", None), ("v_prediction", "dual")]
)
@torch.no_grad()
def test_dds_gradient_equals_the_per_branch_reference(edit_pipe, image, prediction_type, contrast):
    edit_pipe.scheduler = DDIMScheduler.from_config(edit_pipe.scheduler.config, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(11)
    seen = {}

    def remember(pipe, i, t, kwargs):
        if i == 0:
            seen["latents"], seen["state"] = kwargs["latents"].clone(), generator.get_state()
        return kwargs

    out = edit_pipe(
        image, "a cat", "a dog", num_inference_steps=2, learning_rate=1.0, guidance_scale=3.0, contrast=contrast,
        contrast_weight=0.0, generator=generator, output_type="latent", callback_on_step_end=remember,
    )  # fmt: skip
    source = encode_image_latents(edit_pipe.vae, pil_to_tensor(image)).float()
    replay = torch.Generator().set_state(seen["state"])  # the second iteration's t and noise
    t = sample_timestep(replay)
    noise = sample_noise(source.shape, replay, torch.device("cpu"))
    assert t == out.timesteps[1]
    alpha = edit_pipe.scheduler.alphas_cumprod[t].float()
    z_src_t = alpha**0.5 * source + (1 - alpha) ** 0.5 * noise
    z_trg_t = alpha**0.5 * seen["latents"] + (1 - alpha) ** 0.5 * noise
    assert not torch.allclose(z_src_t, z_trg_t)  # the second iteration tells the branches apart
    eps_src = _branch_eps(edit_pipe, z_src_t, t, "a cat", "", 3.0)
    eps_trg = _branch_eps(edit_pipe, z_trg_t, t, "a dog", "", 3.0)
    expected = seen["latents"] - (2000 / 4096) * (eps_trg - eps_src)
    torch.testing.assert_close(out.latents, expected, rtol=1e-4, atol=1e-4)


def test_same_seed_same_edit_other_seed_other_draws(edit_pipe, image):
    def run(seed, global_seed):
        torch.manual_seed(global_seed)  # the global RNG must not matter
        generator = torch.Generator().manual_seed(seed)
        return edit_pipe(image, "a cat", "a dog", num_inference_steps=2, generator=generator, output_type="latent")

    first, again, other = run(1, 0), run(1, 99), run(2, 0)
    assert torch.equal(first.latents, again.latents) and first.timesteps == again.timesteps
    assert first.contrastive_losses == again.contrastive_losses
    assert first.timesteps != other.timesteps and not torch.allclose(first.latents, other.latents)


class _CallSpy(AttentionController):
    """Records, per UNet call, the batch roles, batch size and grad mode seen at one self-attention site."""

    def __init__(self, site: str) -> None:
        super().__init__()
        self.site, self.calls = site, []

    def applies_to(self, site) -> bool:
        return site.name == self.site

    def on_output(self, site, hidden_states):
        self.calls.append((self.batch_roles, hidden_states.shape[0], hidden_states.requires_grad))
        return hidden_states


def test_unet_calls_per_iteration_and_extra_controllers(edit_pipe, image):
    site = "up_blocks.3.attentions.0.transformer_blocks.0.attn1"
    spy = _CallSpy(site)
    before = dict(edit_pipe.unet.attn_processors)
    flags = [p.requires_grad for p in edit_pipe.unet.parameters()]
    edit_pipe(image, "a cat", "a dog", num_inference_steps=2, attention_controllers=[spy], output_type="latent")
    per_iteration = [(("uncond", "cond", "target_uncond"), 3, False), (("cond",), 1, True)]
    assert spy.calls == per_iteration * 2  # source and target uncond, no grad, in one call; target cond with grad
    spy.calls.clear()
    edit_pipe(image, "a cat", "a dog", num_inference_steps=1, contrast=None, attention_controllers=[spy])
    assert spy.calls == [(("uncond", "cond"), 4, False)]  # plain DDS: one batched no-grad call
    assert dict(edit_pipe.unet.attn_processors) == before
    assert [p.requires_grad for p in edit_pipe.unet.parameters()] == flags


def test_mask_keeps_latents_outside(edit_pipe, image):
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1
    out = edit_pipe(image, "a cat", "a dog", num_inference_steps=3, mask=mask, output_type="latent")
    source = encode_image_latents(edit_pipe.vae, pil_to_tensor(image)).float()
    assert torch.equal(out.latents[..., 4:], source[..., 4:])
    assert (out.latents[..., :4] - source[..., :4]).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_edit(edit_pipe, image):
    def run(checkpointing):
        generator = torch.Generator().manual_seed(3)
        return edit_pipe(
            image, "a cat", "a dog", num_inference_steps=1, gradient_checkpointing=checkpointing,
            identity_branch=True, generator=generator, output_type="latent",
        )  # fmt: skip

    plain, checkpointed = run(False), run(True)
    torch.testing.assert_close(plain.latents, checkpointed.latents, rtol=1e-4, atol=1e-5)
    assert not edit_pipe.unet.is_gradient_checkpointing


def test_sdxl_edit_runs_with_both_text_encoders(sdxl_pipe, image):
    pipe = ContrastiveEditPipeline.from_pipe(sdxl_pipe)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image, "a cat", "a dog", num_inference_steps=2, contrast="source", feature="value")
    assert out.images[0].size == (64, 64) and len(out.contrastive_losses) == 2
    assert all(math.isfinite(v) and v > 0 for v in out.contrastive_losses)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source_prompt": ""}, "source_prompt"),
        ({"target_prompt": "  "}, "target_prompt"),
        ({"num_inference_steps": 0}, "iterations"),
        ({"contrast": "both"}, "contrast"),
        ({"mask": torch.ones(32, 48)}, "mask is 48x32"),  # another aspect ratio (32x32 is resized)
        ({"mask": torch.full((64, 64), 0.5)}, "binary"),
        ({"mask": torch.zeros(64, 64)}, "empty"),
        ({"contrast_sites": "up_blocks.9"}, "matches no"),
        ({"min_timestep": 900, "max_timestep": 100}, "min_timestep"),
    ],
)
def test_bad_inputs_raise_input_errors(edit_pipe, image, kwargs, message):
    arguments = {"source_prompt": "a cat", "target_prompt": "a dog", "num_inference_steps": 1, **kwargs}
    with pytest.raises(InputError, match=message):
        edit_pipe(image, arguments.pop("source_prompt"), arguments.pop("target_prompt"), **arguments)


def test_identical_prompts_warn_and_still_run(edit_pipe, image):
    with pytest.warns(UserWarning, match="identical"):
        out = edit_pipe(image, "a cat", "a cat", num_inference_steps=1, output_type="latent")
    assert out.latents.shape == (1, 4, 8, 8)


def _cds_patch_nce(reference: torch.Tensor, current: torch.Tensor, patch_sizes=(1, 2), tau=0.07) -> torch.Tensor:
    """CDS's ``CutLoss.get_attn_cut_loss`` written out from the paper/release (all cells as patches).

    (1, tokens, C) features on a square grid -> per patch size: average-pool, L2-normalise over channels,
    logits [f_ref_i . f_cur_i, f_ref_i . f_cur_j (j != i, diagonal -10)] / tau, cross-entropy with the
    positive first, mean over patches; summed over patch sizes.
    """
    side = math.isqrt(reference.shape[1])
    total = 0.0
    for size in patch_sizes:
        maps = []
        for features in (reference, current):
            grid = features.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = torch.nn.functional.avg_pool2d(grid, size) if size > 1 else grid
            maps.append(torch.nn.functional.normalize(grid, dim=1).permute(0, 2, 3, 1).flatten(0, 2))
        ref, cur = maps[0].detach(), maps[1]
        positive = (ref * cur).sum(-1, keepdim=True)
        negative = (ref @ cur.T).masked_fill(torch.eye(len(ref), dtype=torch.bool), -10.0)
        logits = torch.cat([positive, negative], dim=1) / tau
        total = total + torch.nn.functional.cross_entropy(logits, torch.zeros(len(ref), dtype=torch.long))
    return total


def _attn1_outputs(unet):
    """Forward hooks on the up-block self-attention modules (stock processors): their outputs by name."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _a, out, name=name: outputs.__setitem__(name, out))
        for name, module in unet.named_modules()
        if name.startswith("up_blocks") and name.endswith("attn1")
    ]
    return outputs, handles


def _cds_update(pipe, source, t, noise, w_dds, w_cut):
    """CDS's two latent-gradient terms at z_trg = z_src, from its formulas (no editkit loss code).

    DDS: d/dz [2000 * w_dds * sum(z * (eps_trg - eps_src)) / 4096] (the release's 2000 / (H W) at its
    64 x 64 latents, the resolution normalisation editkit documents); NCE: d/dz [w_cut * cutloss].
    """
    alpha = pipe.scheduler.alphas_cumprod[t].float()
    z_t = alpha**0.5 * source + (1 - alpha) ** 0.5 * noise
    with torch.no_grad():
        dds = 2000 * w_dds * (_branch_eps(pipe, z_t, t, "a dog", "", 7.5) - _branch_eps(pipe, z_t, t, "a cat", "", 7.5))
    outputs, handles = _attn1_outputs(pipe.unet)
    try:
        with torch.no_grad():
            pipe.unet(z_t, t, **_embeds(pipe, "a cat"))
        reference = {name: value.detach() for name, value in outputs.items()}
        with torch.enable_grad():
            z = source.clone().requires_grad_(True)
            pipe.unet(alpha**0.5 * z + (1 - alpha) ** 0.5 * noise, t, **_embeds(pipe, "a dog"))
            cutloss = sum(_cds_patch_nce(reference[name], outputs[name]) for name in sorted(reference))
            (nce,) = torch.autograd.grad(w_cut * cutloss, z)
    finally:
        for handle in handles:
            handle.remove()
    return dds / 4096, nce, float(cutloss.detach())


def test_one_iteration_is_the_cds_update_computed_from_its_formulas(edit_pipe, image):
    source = encode_image_latents(edit_pipe.vae, pil_to_tensor(image)).float()
    replay = torch.Generator().manual_seed(4)
    t = sample_timestep(replay)
    noise = sample_noise(source.shape, replay, torch.device("cpu"))
    dds_term, nce_term, cutloss = _cds_update(edit_pipe, source, t, noise, w_dds=1.0, w_cut=3.0)
    assert nce_term.abs().max() > 0 and dds_term.abs().max() > 0

    def edit(dds_weight):
        out = edit_pipe(
            image, "a cat", "a dog", num_inference_steps=1, learning_rate=1.0, contrast="source",
            contrast_weight=3.0, dds_weight=dds_weight, num_patches=256, generator=torch.Generator().manual_seed(4),
            output_type="latent",
        )  # fmt: skip
        return out, source - out.latents  # the SGD step with lr 1 is the latent gradient

    only_nce, step = edit(0.0)
    assert only_nce.contrastive_losses[0] == pytest.approx(cutloss, rel=1e-4)
    scale = float(nce_term.abs().max())
    torch.testing.assert_close(step, nce_term, rtol=1e-3, atol=1e-3 * scale)  # the NCE term alone: w_cut, no 2000
    _, step = edit(1.0)
    torch.testing.assert_close(step, dds_term + nce_term, rtol=1e-3, atol=1e-3 * scale)


def _embeds(pipe, prompt):
    return {"encoder_hidden_states": encode_text(pipe, [prompt]).prompt_embeds}
