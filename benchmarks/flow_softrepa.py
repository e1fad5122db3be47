"""SoftREPA on MM-DiT: training step vs its B^2 floor, inference overhead and op counts, shapes-sd3 gain.

Speed, on full-width reduced-depth random-weight transformers (``editkit.testing_mmdit.
full_width_transformer``: SD3.5-medium or FLUX.1-dev widths, ``--blocks`` blocks, tokens on the first
``--layers`` joint blocks), measured interleaved in the same run:

- ``step_efficiency``: the floor (one forward + backward of the transformer on the B^2 pairs as one
  batch, gradient into the text context, no tokens) over a SoftREPA step (tokens inserted by
  ``MMDiTSoftTokenController``, the B x B error matrix, contrastive loss, backward, AdamW step);
- ``inference_overhead``: ``--calls`` CFG forwards (batch 2) under one attach with tokens, over the
  same without attach (``plain``); ``processors`` (identity controller) separates the layer's
  pass-through; ``block_hooks`` is the released code's block-level insertion (:func:`released_block_hooks`)
  on the stock processors, the alternative design; ATen op counts of one forward of each;
- ``equivalence``: the largest difference between editkit's attention-level tokens and the block-level
  reference on this model, beside the size of the tokens' effect.

Reduced depth puts tokens on every block (SD3.5-medium: 5 of 24); ``inference_overhead_full_depth_estimate``
scales the measured overhead by ``layers / real depth``, assuming the other blocks cost what these do.

Shapes world (``--shapes``): held-out generation accuracy of shapes-sd3 without and with tokens trained
on the world's captions (``benchmarks.shapes.evaluate``; fixed prompts and seeds; one CPU thread).

    python -m benchmarks.flow_softrepa --family sd3 --repeats 3
    python -m benchmarks.flow_softrepa --shapes-only --shapes-model PATH/shapes-sd3 --shapes-steps 300
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
from pathlib import Path

import torch

from benchmarks.mmdit_overhead import flux_inputs, sd3_inputs
from benchmarks.opcount import OpCounter
from benchmarks.timing import environment, interleaved_medians, print_json
from editkit.attention import AttentionController, attach
from editkit.softrepa import ContrastiveLossConfig
from editkit.softrepa.loss import contrastive_loss, pair_errors
from editkit.softrepa.mmdit_tokens import MMDiTSoftTokenController, MMDiTSoftTokens, default_mmdit_sites
from editkit.testing_mmdit import FLUX1_DEV_TRANSFORMER, SD35_MEDIUM_TRANSFORMER, full_width_transformer

SHAPES_MODEL = Path("assets/models/shapes-sd3")
REAL_DEPTH = {"sd3": 24, "flux": 19}  # SD3.5-medium joint blocks; FLUX.1-dev double-stream blocks
logger = logging.getLogger(__name__)


def released_block_hooks(transformer: torch.nn.Module, soft: MMDiTSoftTokens, timestep: int) -> list:
    """The released code's insertion (``SD3Transformer2DModel_DC.forward``) as block hooks on the stock model.

    Each token layer's tokens go through ``context_embedder``, get ``time[t // 10, layer]`` added, are
    prepended to the text stream entering the block and stripped from the block's text output. FLUX
    (not in the paper): the tokens take the first text position's rotary angles. Returns the handles.
    """
    count, handles = soft.num_tokens, []
    for layer, name in enumerate(soft.sites):
        block = transformer.transformer_blocks[int(name.split(".")[1])]

        def prepend(module, args, kwargs, layer=layer):
            text = kwargs["encoder_hidden_states"]
            tokens = transformer.context_embedder(soft.tokens[layer])
            if soft.time_embedding is not None:
                tokens = tokens + soft.time_embedding[timestep // 10, layer]
            kwargs["encoder_hidden_states"] = torch.cat([tokens.expand(text.shape[0], -1, -1), text], dim=1)
            rotary = kwargs.get("image_rotary_emb")
            if rotary is not None:
                kwargs["image_rotary_emb"] = tuple(torch.cat([t[:1].expand(count, -1), t]) for t in rotary)
            return args, kwargs

        def strip(module, args, output):
            text, image = output
            return (None if text is None else text[:, count:]), image

        handles += [block.register_forward_pre_hook(prepend, with_kwargs=True), block.register_forward_hook(strip)]
    return handles


@contextlib.contextmanager
def block_hooks(transformer, soft, timestep: int):
    handles = released_block_hooks(transformer, soft, timestep)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _model(family: str, blocks: int):
    config = FLUX1_DEV_TRANSFORMER if family == "flux" else SD35_MEDIUM_TRANSFORMER
    return full_width_transformer(config, num_blocks=blocks)


def _inputs(family: str, latent: int, text_tokens: int, batch: int) -> dict:
    make = flux_inputs if family == "flux" else sd3_inputs
    return make(latent, text_tokens, batch, torch.Generator().manual_seed(0))


def _soft(model, layers: int) -> MMDiTSoftTokens:
    sites = default_mmdit_sites(model, layers)
    generator = torch.Generator().manual_seed(1)
    embedder = model.context_embedder
    tokens = torch.randn(len(sites), 4, embedder.in_features, generator=generator) * 0.02
    return MMDiTSoftTokens(tokens, sites, width=embedder.out_features, generator=generator)


def _training_fns(model, family: str, soft, inputs: dict):
    """The SoftREPA step and its floor on ``inputs``' B images and captions (spatial view of FLUX's tokens)."""
    batch, fixed = inputs["hidden_states"].shape[0], {k: v for k, v in inputs.items() if k != "hidden_states"}
    latents = inputs["hidden_states"]
    noise = torch.randn(latents[:1].shape, generator=torch.Generator().manual_seed(2))
    noisy, target = 0.5 * latents + 0.5 * noise, noise - latents  # sigma 0.5; the flow target
    optimizer = torch.optim.AdamW(soft.parameters(), lr=1e-3, weight_decay=1e-4)
    text, pooled = fixed.pop("encoder_hidden_states"), fixed.pop("pooled_projections")
    shared = {k: v[:1] if k in ("timestep", "guidance") else v for k, v in fixed.items()}

    def forward(sample, context, pooled_rows):
        rows = {k: v.expand(sample.shape[0]) if k in ("timestep", "guidance") else v for k, v in shared.items()}
        return model(hidden_states=sample, encoder_hidden_states=context, pooled_projections=pooled_rows, **rows).sample

    def predict(sample, context, added):
        flat = sample.flatten(2).transpose(1, 2) if family == "flux" else sample  # (rows, tokens, 64)
        out = forward(flat, context, added["pooled"])
        return out.transpose(1, 2).reshape(sample.shape) if family == "flux" else out

    spatial = (lambda t: t.transpose(1, 2).unsqueeze(-1)) if family == "flux" else (lambda t: t)
    noisy, target = spatial(noisy), spatial(target)

    def step():
        optimizer.zero_grad(set_to_none=True)
        errors = pair_errors(predict, noisy, target, text, slice(0, batch), {"pooled": pooled})
        contrastive_loss(errors, ContrastiveLossConfig()).backward()
        optimizer.step()

    sample = latents.repeat_interleave(batch, dim=0)
    context = text.repeat(batch, 1, 1).clone().requires_grad_(True)

    def floor():
        context.grad = None
        ((forward(sample, context, pooled.repeat(batch, 1)) - noise) ** 2).mean().backward()

    return step, floor


def _op_count(run) -> int:
    counter = OpCounter()
    with torch.no_grad(), counter:
        run()
    return counter.count


def measure_speed(family: str, blocks: int, layers: int, latent: int, text_tokens: int, repeats: int, calls: int):
    model = _model(family, blocks)
    soft = _soft(model, layers)
    controller = MMDiTSoftTokenController(soft)
    train_inputs = _inputs(family, latent, text_tokens, batch=2)
    result = {"family": family, "blocks": blocks, "token_layers": len(soft.sites), "latent": latent,
              "text_tokens": text_tokens, "pairs_per_step": 4}  # fmt: skip
    step, floor = _training_fns(model, family, soft, train_inputs)
    with attach(model, controller):
        training = interleaved_medians({"floor": floor, "softrepa_step": step}, repeats, 1)
    result["training"] = training
    for clock in ("median_s", "cpu_median_s"):
        ratio = training["floor"][clock] / training["softrepa_step"][clock]
        result[f"step_efficiency_{clock.removesuffix('_s')}"] = ratio
    cfg = _inputs(family, latent, text_tokens, batch=2)
    timestep = int(float(cfg["timestep"][0]) * (1000 if family == "flux" else 1))

    def generation(context_manager):
        def run():
            with torch.no_grad(), context_manager():
                for _ in range(calls):
                    model(**cfg)

        return run

    runs = {
        "plain": generation(contextlib.nullcontext),
        "processors": generation(lambda: attach(model, AttentionController())),
        "tokens": generation(lambda: attach(model, controller)),
        "block_hooks": generation(lambda: block_hooks(model, soft, timestep)),
    }
    inference = interleaved_medians(runs, repeats * 2, 1)
    result["inference"] = inference | {"calls_per_run": calls}
    for clock in ("median_s", "cpu_median_s", "min_s"):
        suffix = clock.removesuffix("_s")
        result[f"inference_overhead_{suffix}"] = inference["tokens"][clock] / inference["plain"][clock] - 1
        result[f"block_hooks_overhead_{suffix}"] = inference["block_hooks"][clock] / inference["plain"][clock] - 1
    share = len(soft.sites) / REAL_DEPTH[family]
    result["inference_overhead_full_depth_estimate"] = result["inference_overhead_cpu_median"] * share
    once = {name: generation_once(model, cfg, manager) for name, manager in
            (("plain", contextlib.nullcontext), ("tokens", lambda: attach(model, controller)),
             ("block_hooks", lambda: block_hooks(model, soft, timestep)))}  # fmt: skip
    result["op_counts"] = {name: _op_count(run) for name, run in once.items()}
    result["equivalence"] = equivalence(model, soft, controller, cfg, timestep)
    return result


def generation_once(model, inputs: dict, manager):
    def run():
        with manager():
            return model(**inputs).sample

    return run


@torch.no_grad()
def equivalence(model, soft, controller, inputs: dict, timestep: int) -> dict:
    """Max |editkit attention-level - released block-level| and the tokens' own effect, on one forward."""
    plain = model(**inputs).sample
    with attach(model, controller):
        ours = model(**inputs).sample
    with block_hooks(model, soft, timestep):
        reference = model(**inputs).sample
    return {"max_abs_difference": float((ours - reference).abs().max()),
            "max_abs_token_effect": float((reference - plain).abs().max())}  # fmt: skip


def shapes_gain(
    model: Path,
    steps: int,
    prompts: int,
    batch_size: int,
    seed: int,
    evaluations: int = 4,
    hard_negatives: int = 0,
    learning_rate: float = 1e-3,
    denoise_weight: float = 10.0,
    logit_form: str = "exp",
) -> dict:
    """Held-out accuracy of shapes-sd3 without tokens and with the tokens of ``evaluations`` checkpoints.

    The same prompts and seeds everywhere; validation and checkpoints coincide, so the keep-best
    token file (``best_val_metric``) is one of the scored checkpoints.
    ``hard_negatives`` > 0: editkit's hard negatives as extra columns, tokens kept by the hard-negative metric.
    ``learning_rate``: the peak rate (the reference's 1e-3 by default). Each checkpoint also records how far its
    tokens moved from the first checkpoint's (relative L2 of the token tensors). ``denoise_weight``: the plain
    denoising loss's weight beside the contrastive loss (the reference's 10 by default; 0: contrastive alone);
    ``logit_form``: the reference's bounded ``"exp"`` logits or ``"linear"`` ones (``ContrastiveLossConfig``).
    """
    from benchmarks.shapes.evaluate import call_kwargs, evaluate, load_pipeline
    from benchmarks.softrepa_curve import checkpoint_tokens, write_training_data
    from editkit.softrepa import TrainConfig, read_soft_tokens, train_soft_tokens, use_soft_tokens
    from editkit.softrepa.runfiles import evaluation_line

    if not (model / "model_index.json").is_file():
        return {"skipped": f"{model} not found"}
    pipe = load_pipeline(str(model), "cpu")
    kwargs = call_kwargs(model)
    before = evaluate(pipe, num_prompts=prompts, steps=28, **kwargs)
    logger.info("without tokens: %s", before)
    every = max(1, steps // evaluations)
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "tokens.safetensors"
        config = TrainConfig(
            data=write_training_data(Path(folder) / "data", 2048, seed=1), model=model, output=output,
            max_steps=steps, batch_size=batch_size, device="cpu", resolution=32, validate_every=every,
            checkpoint_every=every, keep_checkpoints=10**6, val_fraction=0.1, progress=False, seed=seed,
            max_sequence_length=kwargs.get("max_sequence_length"), hard_negatives=hard_negatives,
            keep_best="hard-negatives" if hard_negatives else "group", learning_rate=learning_rate,
            loss=ContrastiveLossConfig(denoise_weight=denoise_weight, logit_form=logit_form),
        )  # fmt: skip
        trained = train_soft_tokens(config, pipe=pipe, report=lambda entry: logger.info(evaluation_line(entry)))
        template = read_soft_tokens(output)
        curve, first = [], None
        for entry in trained.log:
            tokens = checkpoint_tokens(config.checkpoint_dir / f"step-{entry['step']:07d}.safetensors", template)
            now = _token_tensors(tokens)
            first = first or now
            entry = entry | {"token_change_from_first_checkpoint": _relative_change(first, now)}
            with use_soft_tokens(pipe.transformer, MMDiTSoftTokenController(tokens)):
                scores = evaluate(pipe, num_prompts=prompts, steps=28, **kwargs)
            curve.append(entry | {"generation": scores, "minus_without": _gain(before, scores)})
            logger.info("step %d: %s", entry["step"], curve[-1]["minus_without"])
    return {
        "model": str(model), "steps": steps, "batch_size": batch_size, "prompts_per_category": prompts,
        "hard_negatives": hard_negatives, "learning_rate": learning_rate, "denoise_weight": denoise_weight,
        "logit_form": logit_form, "best_val_metric": trained.best_metric, "without_tokens": before, "curve": curve,
    }  # fmt: skip


def _token_tensors(tokens) -> dict[str, torch.Tensor]:
    """Copies of a soft-token set's trained tensors (``checkpoint_tokens`` refills one template in place)."""
    tensors = {"tokens": tokens.tokens, "time_embedding": tokens.time_embedding}
    return {name: value.detach().float().clone() for name, value in tensors.items() if value is not None}


def _relative_change(first: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> dict[str, float]:
    """|b - a| / |a| per tensor of two soft-token checkpoints (the tokens and the time vectors)."""
    return {name: float((now[name] - a).norm() / a.norm().clamp_min(1e-12)) for name, a in first.items()}


def _gain(before: dict, after: dict) -> dict:
    keys = ("single_color_and_shape_accuracy", "pair_both_colors", "pair_both_colors_and_shapes", "relation_accuracy")
    return {key: after[key] - before[key] for key in keys if key in before}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd3", "flux"), default="sd3")
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (FLUX: double and single each)")
    parser.add_argument("--layers", type=int, default=5, help="token layers (the first joint blocks)")
    parser.add_argument("--latent", type=int, default=16, help="latent side (patch 2: (latent/2)^2 image tokens)")
    parser.add_argument("--text-tokens", type=int, default=77)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2, help="CFG forwards per timed generation")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--shapes", action="store_true", help="also the shapes-sd3 gain")
    parser.add_argument("--shapes-only", action="store_true")
    parser.add_argument("--shapes-model", type=Path, default=SHAPES_MODEL)
    parser.add_argument("--shapes-steps", type=int, default=300)
    parser.add_argument("--shapes-prompts", type=int, default=64)
    parser.add_argument("--shapes-batch-size", type=int, default=4)
    parser.add_argument("--shapes-evaluations", type=int, default=4, help="checkpoints scored along training")
    parser.add_argument("--shapes-hard-negatives", type=int, default=0, help="as softrepa train --hard-negatives")
    parser.add_argument("--shapes-lr", type=float, default=1e-3, help="peak learning rate of the token training")
    parser.add_argument(
        "--shapes-denoise-weight", type=float, default=10.0, help="denoising loss weight (reference 10; 0: none)"
    )
    parser.add_argument("--shapes-logit-form", choices=("exp", "linear"), default="exp", help="reference: exp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    result = {"environment": environment(), "threads": args.threads}
    if not args.shapes_only:
        result["speed"] = measure_speed(
            args.family, args.blocks, args.layers, args.latent, args.text_tokens, args.repeats, args.calls
        )
    if args.shapes or args.shapes_only:
        result["shapes_world"] = shapes_gain(
            args.shapes_model,
            args.shapes_steps,
            args.shapes_prompts,
            args.shapes_batch_size,
            args.seed,
            args.shapes_evaluations,
            args.shapes_hard_negatives,
            args.shapes_lr,
            args.shapes_denoise_weight,
            args.shapes_logit_form,
        )
    print_json(result)


if __name__ == "__main__":
    main()
