"""SoftREPA on the shapes world: held-out generation accuracy against training steps, and its diagnosis.

One run trains tokens on rendered shapes-world scenes (training-split captions only) with the
library's reference settings and a checkpoint at every evaluation, then scores each checkpoint:

- generation: ``benchmarks.shapes.evaluate`` on held-out prompts (the same prompts and seeds for
  every checkpoint and for the model without tokens), per category;
- the training log: loss, contrastive accuracy on the training pairs, the keep-best held-out
  metric (the true caption's denoising error lowest among a group of 4 validation captions);
- a hard-negative metric on separate validation scenes (training-split captions): the true
  caption's error against the same scene with the two objects' colours swapped (binding) and,
  for relations, the opposite relation (``editkit.softrepa.hard_negatives``, which gives the same
  captions as swapping the scene's objects' colours and relation; a test checks it). That is the
  distinction generation gets wrong; the in-batch metric compares captions that differ in almost
  everything.

Usage: ``python -m benchmarks.softrepa_curve --steps 2000 --eval-every 500 --prompts 64``; training
options as ``editkit softrepa train``: ``--hard-negatives N --keep-best hard-negatives --token-init normal``
(prints one JSON document; CPU: about 0.4 s per step and 2.5 min per evaluation of 3 x 64 prompts).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from benchmarks.timing import environment, print_json

SHAPES_MODEL = Path("assets/models/shapes-sd")
logger = logging.getLogger(__name__)


def write_training_data(folder: Path, count: int, seed: int) -> Path:
    """``count`` rendered training scenes (training-split captions) as a metadata.jsonl folder."""
    from PIL import Image

    from benchmarks.shapes.world import sample_batch

    folder.mkdir(parents=True, exist_ok=True)
    images, captions, _ = sample_batch(seed=seed, n=count, training=True)
    rows = []
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(image).save(folder / f"{index}.png")
        rows.append(json.dumps({"file_name": f"{index}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))
    return folder


@torch.no_grad()
def hard_negative_accuracy(pipe, scenes, images, timesteps=(250, 500, 750), seed: int = 0) -> float:
    """Fraction of scenes whose true caption has a lower denoising error than each hard negative.

    Errors are averaged over ``timesteps`` with one fixed noise per scene (as the training metric).
    """
    from editkit.conditioning import encode_text
    from editkit.inversion import encode_image_latents
    from editkit.softrepa.hard_negatives import hard_negatives
    from editkit.softrepa.loss import diffusion_target, noisy_latents

    hits = []
    alphas = pipe.scheduler.alphas_cumprod.float()
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    for index, scene in enumerate(scenes):
        captions = [scene.caption, *hard_negatives(scene.caption)]
        embeds = encode_text(pipe, captions).prompt_embeds
        pixels = torch.from_numpy(images[index]).permute(2, 0, 1)[None].float() / 127.5 - 1
        latents = encode_image_latents(pipe.vae, pixels).float()
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + index))
        errors = torch.zeros(len(captions))
        for timestep in timesteps:
            sample = noisy_latents(latents, noise, alphas[timestep]).expand(len(captions), -1, -1, -1)
            target = diffusion_target(latents, noise, alphas[timestep], prediction_type)
            prediction = pipe.unet(sample, timestep, encoder_hidden_states=embeds).sample
            errors += ((prediction - target) ** 2).mean(dim=(1, 2, 3))
        hits.append(bool(errors[0] < errors[1:].min()))
    return sum(hits) / len(hits)


def checkpoint_tokens(path: Path, template):
    """The soft tokens stored in training checkpoint ``path`` (sites and layout from ``template``)."""
    from editkit.softrepa.files import read_safetensors

    tensors, _ = read_safetensors(path, "checkpoint")
    with torch.no_grad():
        template.tokens.copy_(tensors["soft.tokens"])
        if template.time_embedding is not None:
            template.time_embedding.copy_(tensors["soft.time_embedding"])
    return template


@torch.no_grad()
def text_token_norm(pipe, captions: list[str]) -> float:
    """Mean L2 norm of the text encoder's output tokens (the scale the soft tokens sit beside)."""
    from editkit.conditioning import encode_text

    return float(encode_text(pipe, captions).prompt_embeds.norm(dim=-1).mean())


def score(pipe, prompts: int, hard_set, soft=None) -> dict:
    """Generation accuracy on held-out prompts and the hard-negative metric, with ``soft`` tokens or without."""
    import contextlib

    from benchmarks.shapes.evaluate import evaluate
    from editkit.softrepa import SoftTokenController, use_soft_tokens

    scenes, images = hard_set
    with use_soft_tokens(pipe.unet, SoftTokenController(soft)) if soft is not None else contextlib.nullcontext():
        result = evaluate(pipe, num_prompts=prompts)
        result["hard_negative_accuracy"] = hard_negative_accuracy(pipe, scenes, images)
    return result


def run(args) -> dict:
    from benchmarks.shapes.evaluate import load_pipeline
    from benchmarks.shapes.world import sample_batch
    from editkit.softrepa import ContrastiveLossConfig, TrainConfig, read_soft_tokens, train_soft_tokens
    from editkit.softrepa.runfiles import evaluation_line

    pipe = load_pipeline(str(SHAPES_MODEL), "cpu")
    images, _, scenes = sample_batch(seed=args.hard_seed, n=args.hard_scenes * 3, training=True)
    pairs = [i for i, scene in enumerate(scenes) if len(scene.objects) == 2][: args.hard_scenes]
    hard_set = ([scenes[i] for i in pairs], images[pairs])
    result = {"environment": environment(), "settings": vars(args) | {"hard_scenes_used": len(pairs)}}
    result["text_token_norm"] = text_token_norm(pipe, [scene.caption for scene in hard_set[0]])
    if not args.no_baseline:
        result["without_tokens"] = score(pipe, args.prompts, hard_set)
        logger.info("without tokens: %s", result["without_tokens"])
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "tokens.safetensors"
        config = TrainConfig(
            data=write_training_data(Path(folder) / "data", args.train_images, seed=1), model=SHAPES_MODEL,
            output=output, max_steps=args.steps, batch_size=args.batch_size, device="cpu", resolution=32,
            validate_every=args.eval_every, checkpoint_every=args.eval_every, keep_checkpoints=10**6,
            val_fraction=0.1, progress=False, time_layout=args.time_layout, time_buckets=args.time_buckets,
            seed=args.seed, loss=ContrastiveLossConfig(args.logit_form, args.tau, denoise_weight=args.denoise_weight),
            hard_negatives=args.hard_negatives, keep_best=args.keep_best, token_init=args.token_init,
            learning_rate=args.learning_rate,
        )  # fmt: skip
        trained = train_soft_tokens(config, pipe=pipe, report=lambda entry: logger.info(evaluation_line(entry)))
        template = read_soft_tokens(output)
        curve = []
        for entry in trained.log:
            path = config.checkpoint_dir / f"step-{entry['step']:07d}.safetensors"
            scores = score(pipe, args.prompts, hard_set, checkpoint_tokens(path, template))
            scores["token_norm"] = float(template.tokens.detach().norm(dim=-1).mean())  # vs text_token_norm
            curve.append(entry | scores)
            logger.info("step %d: %s", entry["step"], scores)
            Path(args.partial).write_text(json.dumps(result | {"curve": curve}, indent=1))
    best_step = next(e["step"] for e in trained.log if [e["val_accuracy"], e["val_margin"]] == trained.best_metric)
    result |= {"curve": curve, "best_metric": trained.best_metric, "best_step": best_step}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts per category")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--hard-scenes", type=int, default=128, help="validation scenes of the hard-negative metric")
    parser.add_argument("--hard-seed", type=int, default=2, help="seed of those scenes (training-split captions)")
    parser.add_argument("--time-layout", choices=("shared", "per-token"), default="shared")
    parser.add_argument("--time-buckets", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logit-form", choices=("exp", "linear"), default="exp", help="as softrepa train")
    parser.add_argument("--tau", type=float, default=0.07)
    parser.add_argument("--denoise-weight", type=float, default=10.0, help="reference: 10")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="as softrepa train (default: 1e-3)")
    parser.add_argument("--hard-negatives", type=int, default=0, help="as softrepa train (default: 0)")
    parser.add_argument("--keep-best", choices=("group", "hard-negatives"), default="group", help="as softrepa train")
    parser.add_argument("--token-init", choices=("text", "normal"), default="text", help="as softrepa train")
    parser.add_argument("--no-baseline", action="store_true", help="skip the scores without tokens (measured before)")
    parser.add_argument("--partial", default="softrepa_curve.partial.json", help="results so far, rewritten as it goes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    print_json(run(args))


if __name__ == "__main__":
    main()
