"""Text conditioning equals what diffusers' own SD / SDXL pipelines feed the UNet."""

from __future__ import annotations

import torch

from editkit.conditioning import TextConditioning, encode_text, is_sdxl_unet


def test_sd15_matches_diffusers(sd15_pipe):
    ours = encode_text(sd15_pipe, ["a red circle", ""])
    theirs, negative = sd15_pipe.encode_prompt("a red circle", "cpu", 1, True, negative_prompt="")
    assert ours.added_cond_kwargs is None and not is_sdxl_unet(sd15_pipe.unet)
    assert torch.equal(ours.prompt_embeds[0], theirs[0]) and torch.equal(ours.prompt_embeds[1], negative[0])


def test_sdxl_matches_diffusers(sdxl_pipe):
    ours = encode_text(sdxl_pipe, "a red circle", height=128, width=96)
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours.prompt_embeds, embeds)
    assert torch.equal(ours.added_cond_kwargs["text_embeds"], pooled)
    assert ours.added_cond_kwargs["time_ids"].tolist() == [[128, 96, 0, 0, 128, 96]]
    # "" is encoded as diffusers encodes a prompt; only the default negative is zeroed (force_zeros_for_empty_prompt)
    empty = encode_text(sdxl_pipe, [""])
    empty_embeds, _, empty_pooled, _ = sdxl_pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    assert torch.count_nonzero(empty_embeds) > 0
    assert torch.equal(empty.prompt_embeds, empty_embeds)
    assert torch.equal(empty.added_cond_kwargs["text_embeds"], empty_pooled)
    negative = encode_text(sdxl_pipe, [""], default_negative=True)
    _, zero_embeds, _, zero_pooled = sdxl_pipe.encode_prompt("x", device="cpu", do_classifier_free_guidance=True)
    assert sdxl_pipe.config.force_zeros_for_empty_prompt and torch.count_nonzero(zero_embeds) == 0
    assert torch.equal(negative.prompt_embeds, zero_embeds) and torch.equal(
        negative.added_cond_kwargs["text_embeds"], zero_pooled
    )


def test_cat_and_repeat_keep_rows_aligned(sdxl_pipe):
    a, b = encode_text(sdxl_pipe, "a"), encode_text(sdxl_pipe, "b")
    both = TextConditioning.cat([a, b]).repeat(2)
    assert both.prompt_embeds.shape[0] == 4
    assert torch.equal(both.prompt_embeds[2], b.prompt_embeds[0])
    assert torch.equal(both.unet_kwargs()["added_cond_kwargs"]["text_embeds"][3], b.added_cond_kwargs["text_embeds"][0])
