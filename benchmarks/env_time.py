"""Wall time of ``editkit env`` against its floor, ``python -c "import torch"`` (the one heavy import it needs).

    python -m benchmarks.env_time [--repeats 5]

Prints JSON: the median wall seconds of each (fresh processes, ``HF_HUB_OFFLINE=1``) and their ratio.
The target is ``editkit env`` under 3 s on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(command: list[str], repeats: int) -> float:
    """Median wall seconds of ``command`` over ``repeats`` fresh processes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    floor = wall([sys.executable, "-c", "import torch"], args.repeats)
    env = wall([sys.executable, "-m", "editkit.cli", "env"], args.repeats)
    result = {"import_torch_s": round(floor, 3), "editkit_env_s": round(env, 3), "ratio": round(env / floor, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
