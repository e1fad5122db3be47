"""Make the demo soft-token file of the app's Soft tokens tab: ``assets/demo/shapes-softrepa.safetensors``.

SoftREPA tokens trained briefly, with editkit's own trainer and token writer
(``editkit.softrepa.train_soft_tokens`` -> ``save_soft_tokens``), on the shipped shapes model
(``assets/models/shapes-sd``) and captioned scenes of its own world (``benchmarks/shapes/world.py``)::

    python examples/make_demo_tokens.py            # a few minutes on a 2-core CPU; deterministic (seed 0)
    python examples/make_demo_tokens.py --max-steps 400 --output /tmp/tokens.safetensors

Beside it, ``shapes-softrepa.log.json`` is the run's validation log. It is a demonstration file
(a short run on a toy model, about 27 KB), not a quality claim: ``editkit softrepa train`` with
real data is the way to real tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHAPES_MODEL = ROOT / "assets" / "models" / "shapes-sd"
OUTPUT = ROOT / "assets" / "demo" / "shapes-softrepa.safetensors"


def shapes_data(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` rendered shapes-world scenes with their captions (``metadata.jsonl``, as ``softrepa train`` reads)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.shapes.world import sample_batch

    images, captions, _ = sample_batch(seed, count)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (pixels, caption) in enumerate(zip(images, captions)):
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
        rows.append(json.dumps({"file_name": f"{index:03d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"token file to write (default: {OUTPUT})")
    parser.add_argument("--max-steps", type=int, default=100, help="training steps (default: 100)")
    parser.add_argument("--images", type=int, default=128, help="captioned scenes to train on (default: 128)")
    args = parser.parse_args()

    from editkit.softrepa import TrainConfig, train_soft_tokens

    workdir = Path(tempfile.mkdtemp(prefix="editkit-demo-tokens-"))
    config = TrainConfig(
        data=shapes_data(workdir / "data", args.images),
        model=SHAPES_MODEL,
        output=args.output,
        max_steps=args.max_steps,
        batch_size=8,
        resolution=32,  # the shapes model's native size
        device="cpu",
        seed=0,
        validate_every=50,
        checkpoint_every=args.max_steps,
        overwrite=True,
    )
    result = train_soft_tokens(config)
    shutil.rmtree(args.output.with_suffix(".checkpoints"), ignore_errors=True)  # resume state: not shipped
    print(f"trained {result.steps} steps; last loss {result.losses[-1]:.4f}; wrote {args.output}")


if __name__ == "__main__":
    main()
