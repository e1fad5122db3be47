"""Stylize a content image with a style image, then reuse the style's cache for a second content.

python examples/stylize.py content.png style.png --model stable-diffusion-v1-5/stable-diffusion-v1-5
python examples/stylize.py --tiny          # offline: a tiny random model and random images (runs anywhere)
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from editkit.image import load_image
from editkit.models import load_pipeline
from editkit.style import StyleCache
from pipelines.style_transfer import StyleTransferPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("content", nargs="?")
    parser.add_argument("style", nargs="?")
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="tiny random model and images (no download)")
    args = parser.parse_args()

    if args.tiny:
        from editkit.testing import tiny_sd15_pipeline

        pipe = StyleTransferPipeline.from_pipe(tiny_sd15_pipeline())
        rng = np.random.default_rng(0)
        content, other, style = (Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3))
        steps = 4
    else:
        pipe = load_pipeline(StyleTransferPipeline, args.model)
        content, style = load_image(args.content), load_image(args.style)
        other, steps = content.transpose(Image.Transpose.FLIP_LEFT_RIGHT), args.steps

    # gamma: content query preservation; tau: attention temperature; adain_strength: style colours.
    out = pipe(content, style, num_inference_steps=steps, gamma=0.75, tau=1.5, adain_strength=0.6)
    out.images[0].save("stylized.png")
    out.style_caches[0].save("style_cache.safetensors", overwrite=True)

    # The style's keys/values are reused: only the new content is inverted (N + N UNet passes).
    cache = StyleCache.load("style_cache.safetensors")
    again = pipe(other, style_cache=cache, num_inference_steps=steps)
    again.images[0].save("stylized_2.png")
    print("wrote stylized.png, stylized_2.png and style_cache.safetensors")


if __name__ == "__main__":
    main()
