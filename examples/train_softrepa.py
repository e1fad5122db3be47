"""Train SoftREPA soft tokens and generate with them.

With a real model and captioned images (a folder of images + metadata.jsonl, e.g. a COCO subset)::

    python examples/train_softrepa.py --data coco_subset/ --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --output tokens.safetensors --max-steps 2000

Without arguments it runs offline on a tiny random model and a generated toy data set (seconds on
a CPU), to show the whole path: data -> training -> token file -> generation with tokens.
Several processes: ``accelerate launch --multi_gpu --num_processes 2 examples/train_softrepa.py ...``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from editkit.softrepa import TrainConfig, load_soft_tokens, train_soft_tokens, use_soft_tokens


def toy_data(folder: Path, count: int = 16) -> Path:
    """Solid-colour images captioned with their colour."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        name, rgb = list(colours.items())[index % len(colours)]
        pixels = np.clip(np.array(rgb) + np.random.RandomState(index).randint(-20, 20, (64, 64, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
        rows.append(json.dumps({"file_name": f"{index}.png", "text": f"a {name} square"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows), encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="softrepa-example-"))
    model = args.model
    if model is None:  # offline demo: a tiny random SD 1.5-topology pipeline
        from editkit.testing import tiny_sd15_pipeline

        model = workdir / "tiny-model"
        tiny_sd15_pipeline(path=model)
        args.device = args.device or "cpu"
    data = args.data or toy_data(workdir / "data")
    output = args.output or workdir / "tokens.safetensors"
    config = TrainConfig(
        data=data, model=model, output=output, max_steps=args.max_steps, batch_size=2 if args.model is None else 4,
        resolution=64 if args.model is None else 512, device=args.device, validate_every=2, checkpoint_every=2,
    )  # fmt: skip
    result = train_soft_tokens(config)
    print(f"trained {result.steps} steps; last loss {result.losses[-1]:.4f}; tokens in {output}")

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model).to(args.device or "cpu")
    tokens = load_soft_tokens(output, unet=pipe.unet, strength=1.0)
    size = 64 if args.model is None else None
    with use_soft_tokens(pipe.unet, tokens):
        image = pipe("a red square", num_inference_steps=4 if args.model is None else 30, height=size, width=size,
                     generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    image.save(workdir / "with_tokens.png")
    print(f"image with tokens: {workdir / 'with_tokens.png'}")


if __name__ == "__main__":
    main()
