"""How long repeated constraints hold the app's shared model (issue 15.2), as JSON.

Runs the app's compose endpoint (``editkit.app.handlers.Handlers``, no server) on the shipped
shapes model with one entity constraint, then with the same entity repeated ``--copies`` times,
and reports the wall time of each request, their ratio, and the growth of the process's
resident memory. Since 15.2 repeated constraints count once, so the ratio should be ~1.

    python -m benchmarks.constraint_limits --copies 300 --steps 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    """The process's current resident memory in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets" / "models" / "shapes-sd"))
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt", default="a red circle to the left of a blue square")
    args = parser.parse_args()

    import torch

    from editkit.app.handlers import Handlers
    from editkit.app.models import ModelManager

    torch.set_num_threads(1)
    handlers = Handlers(ModelManager(args.model, device="cpu"), tempfile.mkdtemp(prefix="constraint-limits-"))
    handlers.compose(args.prompt, "", False, 1, 7.5, 0)  # load the model, warm up
    results = {}
    for name, copies in (("one", 1), ("repeated", args.copies)):
        constraints = json.dumps({"entities": ["circle"] * copies})
        before, start = _rss_mb(), time.perf_counter()
        _, _, _, report = handlers.compose(args.prompt, constraints, True, args.steps, 7.5, 0)
        results[name] = {
            "copies": copies,
            "seconds": round(time.perf_counter() - start, 2),
            "rss_growth_mb": round(_rss_mb() - before, 1),
            "entities_used": len(report["constraints"]["entities"]),
        }
    results["time_ratio_repeated_over_one"] = round(results["repeated"]["seconds"] / results["one"]["seconds"], 2)
    results.update(model=args.model, steps=args.steps, torch=torch.__version__)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
