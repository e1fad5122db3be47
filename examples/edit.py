"""Edit a real image with the dual contrastive denoising score (DDS + PatchNCE on self-attention).

    python examples/edit.py cat.png "a photo of a cat" "a photo of a dog" -o dog.png
    python examples/edit.py --tiny   # offline smoke run on a tiny random model (the output is noise)

Compares the three readings side by side when ``--compare`` is given: plain DDS, CDS (source-anchored
PatchNCE) and the dual contrastive loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # pipelines/ importable from a source checkout
    sys.path.insert(0, str(ROOT))

from editkit.image import fit_size, load_image, resize_to  # noqa: E402
from editkit.models import load_pipeline  # noqa: E402
from pipelines.contrastive_edit import ContrastiveEditPipeline  # noqa: E402


def tiny_pipeline() -> ContrastiveEditPipeline:
    """A random tiny SD 1.5-topology pipeline (no download): shows the mechanics only."""
    from editkit.testing import tiny_sd15_pipeline

    return ContrastiveEditPipeline.from_pipe(tiny_sd15_pipeline(seed=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", type=Path)
    parser.add_argument("source_prompt", nargs="?", default="a photo of a cat")
    parser.add_argument("target_prompt", nargs="?", default="a photo of a dog")
    parser.add_argument("-o", "--output", type=Path, default=Path("edited.png"))
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--steps", type=int, default=200, help="DDS optimisation iterations (num_inference_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="also run plain DDS and CDS; save a strip")
    parser.add_argument("--tiny", action="store_true", help="offline smoke run on a tiny random model")
    args = parser.parse_args()

    if args.tiny:
        pipe, args.steps = tiny_pipeline(), min(args.steps, 5)
        rng = np.random.default_rng(0)
        image = Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8))
    else:
        if args.image is None:
            parser.error("give an IMAGE (or --tiny)")
        pipe = load_pipeline(ContrastiveEditPipeline, args.model)
        image = load_image(args.image)
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        image = resize_to(image, fit_size(*image.size, multiple=pipe.vae_scale_factor, max_side=native))

    variants = {"dual": "dual"} if not args.compare else {"dds": None, "cds": "source", "dual": "dual"}
    results = []
    for name, contrast in variants.items():
        generator = torch.Generator().manual_seed(args.seed)  # the same draws for every variant
        output = pipe(
            image, args.source_prompt, args.target_prompt, num_inference_steps=args.steps,
            contrast=contrast, generator=generator,
        )  # fmt: skip
        print(f"{name}: final contrastive loss {output.contrastive_losses[-1:]}")
        results.append(output.images[0])
    strip = Image.new("RGB", (image.width * (len(results) + 1), image.height))
    for index, picture in enumerate([image, *results]):
        strip.paste(picture, (index * image.width, 0))
    (strip if args.compare else results[0]).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
