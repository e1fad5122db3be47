"""Every editkit benchmark in one command: one JSON document and one Markdown table.

Each benchmark runs as its own subprocess (``python -m benchmarks.<name>``, memory isolated, a
failure recorded rather than fatal) and prints JSON that is gathered here. Profiles:

- ``--quick`` (CPU): full-size architectures with random weights at reduced size and few steps.
- ``--cuda``: fp16 at 512 px (SD 1.5) with the papers' step counts, SDXL at 1024 px (full-size
  architecture, random weights): seconds per image and peak GPU memory.
- ``--smoke``: the smallest sizes, one repeat: checks that every benchmark runs.

Every speed figure is a ratio against a baseline measured in the same run (stock processors, plain
generation or the UNet-evaluation floor), with the absolute times kept in the JSON. Two sections run
here: ``fastpaths`` (torch.compile graphs/breaks/recompiles per controller; on CUDA compiled and
channels_last speed-ups) and ``sdxl`` (CUDA only).

    python -m benchmarks.run --quick --output benchmarks/out/results.json
"""

# ruff: noqa: E501  (the profile and figure tables read best one entry per line)
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.timing import environment

PROFILES: dict[str, dict[str, list[str]]] = {
    "smoke": {
        "attention_overhead": ["--size", "64", "--repeats", "1"],
        "stylize": ["--size", "64", "--steps", "2", "--repeats", "1"],
        "edit": ["--size", "64", "--iterations", "1", "--repeats", "1", "--shapes-scenes", "1", "--shapes-iterations", "5"],
        "compose": ["--size", "64", "--steps", "2", "--repeats", "1", "--warmup", "0", "--shapes-prompts", "2", "--shapes-steps", "4"],
        "softrepa": ["--resolution", "64", "--batch-size", "2", "--repeats", "1", "--shapes-steps", "4", "--shapes-prompts", "4"],
        "research_baselines": ["--size", "64", "--steps", "2", "--repeats", "1"],
        "memory_estimate": [],
        "opcount": ["--size", "64", "--steps", "2", "--iterations", "1"],
    },
    "quick": {
        "attention_overhead": ["--size", "128", "--repeats", "3"],
        "stylize": ["--size", "128", "--steps", "4", "--repeats", "2"],
        "edit": ["--size", "128", "--iterations", "2", "--repeats", "2", "--shapes-scenes", "4", "--shapes-iterations", "50"],
        "compose": ["--size", "128", "--steps", "20", "--repeats", "2", "--shapes-prompts", "10", "--shapes-steps", "25"],
        "softrepa": ["--resolution", "128", "--batch-size", "2", "--repeats", "2", "--shapes-steps", "100", "--shapes-prompts", "40"],
        "research_baselines": ["--size", "128", "--steps", "4", "--repeats", "2"],
        "memory_estimate": [],
        "opcount": ["--size", "256", "--steps", "4", "--iterations", "2"],
    },
    "cuda": {  # the papers' step counts: 50 DDIM steps (StyleID/AttenST, A&E/INITNO), DDS/CDS iterations
        "attention_overhead": ["--size", "512", "--repeats", "10"],
        "stylize": ["--size", "512", "--steps", "50", "--repeats", "3"],
        "edit": ["--size", "512", "--iterations", "20", "--repeats", "3"],
        "compose": ["--size", "512", "--steps", "50", "--repeats", "3"],
        "softrepa": ["--resolution", "512", "--batch-size", "4", "--repeats", "5"],
        "research_baselines": ["--size", "512", "--steps", "50", "--repeats", "3"],
        "memory_estimate": [],
        "opcount": ["--size", "512", "--steps", "4", "--iterations", "2"],
    },
}  # fmt: skip
SHAPES_FLAGS = {name: ["--skip-shapes"] for name in ("stylize", "edit", "compose", "softrepa")}  # shapes parts off

# (benchmark, path in its JSON, label, target, "<=" or ">=" or None): the Markdown table's rows.
FIGURES: list[tuple[str, str, str, float | None, str | None]] = [
    ("attention_overhead", "cpu_ratio_identity_vs_stock", "pass-through / stock (CPU time)", 1.03, "<="),
    ("attention_overhead", "ratio_identity_vs_stock", "pass-through / stock (wall)", 1.03, "<="),
    ("attention_overhead", "cpu_ratio_maps_vs_stock", "with 16x16 maps / stock (CPU time)", 1.05, "<="),
    ("stylize", "efficiency.configs.stylize_uncached.ratio_cpu", "stylize / UNet floor (CPU time)", 1.10, "<="),
    (
        "stylize",
        "efficiency.configs.stylize_cached_style.ratio_cpu",
        "cached style / UNet floor (CPU time)",
        1.10,
        "<=",
    ),
    ("stylize", "cache.ratio", "cache bytes / StyleID's", 0.25, "<="),
    ("stylize", "memory.increase", "peak RSS increase over plain (bytes, CPU)", None, None),
    ("stylize", "memory.stylize", "peak memory stylize (bytes, CUDA)", None, None),
    ("edit", "efficiency.cds_source_vs_floor_schedule_cpu", "CDS floor / iteration (CPU time)", 0.85, ">="),
    ("edit", "efficiency.dual_vs_floor_schedule_cpu", "dual floor / iteration (CPU time)", 0.85, ">="),
    ("edit", "efficiency.dds_vs_floor_dds_cpu", "DDS floor / iteration (CPU time)", 0.85, ">="),
    ("compose", "speed.stage1_cpu_ratio", "stage 1 / plain generation (CPU time)", 1.8, "<="),
    ("compose", "speed.full_cpu_ratio", "full two-stage / plain generation (CPU time)", 2.6, "<="),
    ("compose", "speed.stage1_efficiency_cpu", "stage 1 UNet floor / stage 1 (CPU time)", 0.85, ">="),
    ("compose", "speed.stage1_wall_ratio", "stage 1 / plain generation (wall)", 1.8, "<="),
    ("compose", "speed.full_wall_ratio", "full two-stage / plain generation (wall)", 2.6, "<="),
    ("compose", "speed.full_down_only_cpu_ratio", "full, down-path maps (opt-in) / plain (CPU time)", 2.6, "<="),
    ("compose", "speed.full_down_only_wall_ratio", "full, down-path maps (opt-in) / plain (wall)", 2.6, "<="),
    ("softrepa", "step_efficiency_cpu_median", "floor / training step (CPU time)", 0.9, ">="),
    ("softrepa", "inference_overhead_cpu_median", "token inference overhead (CPU time)", 0.03, "<="),
    ("research_baselines", "style.editkit_gain.record", "StyleID hooks / editkit, recording (CPU time)", 1.0, ">="),
    ("research_baselines", "style.editkit_gain.inject", "StyleID hooks / editkit, injection (CPU time)", 1.0, ">="),
    (
        "research_baselines",
        "style.vs_stock_forward.editkit_inject.cpu",
        "editkit injection / stock forward",
        None,
        None,
    ),
    (
        "research_baselines",
        "materialised.cds_vs_editkit.cpu",
        "CDS materialised / editkit, fwd+bwd (CPU time)",
        1.0,
        ">=",
    ),
    ("research_baselines", "decode_per_step.paper_vs_editkit.cpu", "decode every step / once (CPU time)", 1.0, ">="),
    ("memory_estimate", "stylize_vs_plain_cache_excluded", "SDXL 1024 stylize / plain peak, cache excluded", 1.3, "<="),
    ("memory_estimate", "stylize_cfg_cache_on_gpu.with_margin_gb", "SDXL 1024 stylize, cache on GPU (GB)", 24.0, "<="),
    (
        "memory_estimate",
        "stylize_cfg_cache_streamed_from_cpu.with_margin_gb",
        "SDXL 1024 stylize, cache streamed (GB)",
        24.0,
        "<=",
    ),
    ("memory_estimate", "edit.with_margin_gb", "SDXL 1024 edit (GB)", 24.0, "<="),
    ("memory_estimate", "edit_checkpointed.with_margin_gb", "SDXL 1024 edit, checkpointing (GB)", 24.0, "<="),
    ("opcount", "methods.pass_through.ratio", "pass-through / stock, ATen ops", 1.0, "<="),
    ("opcount", "methods.plain_generation.ratio", "plain generation / UNet floor, ATen ops", None, None),
    ("opcount", "methods.stylize.ratio", "stylize / UNet floor, ATen ops", 1.10, "<="),
    ("opcount", "methods.edit_dds.ratio", "DDS edit / UNet floor, ATen ops", 1.10, "<="),
    ("opcount", "methods.edit_cds.ratio", "CDS edit / UNet floor, ATen ops", 1.10, "<="),
    ("opcount", "methods.edit_dual.ratio", "dual edit / UNet floor, ATen ops", 1.10, "<="),
    ("opcount", "methods.compose_stage1.ratio", "compose stage 1 / UNet floor, ATen ops", 1.10, "<="),
    ("opcount", "methods.soft_token_generation.ratio", "soft-token generation / UNet floor, ATen ops", 1.10, "<="),
]


def parse_json(stdout: str) -> dict:
    """The JSON document a benchmark printed (``print_json``: a top-level ``{`` line to the end)."""
    lines = stdout.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if lines[index] == "{":
            return json.loads("\n".join(lines[index:]))
    raise ValueError("no JSON document in the benchmark's output")


def run_benchmark(name: str, args: list[str], timeout: float) -> dict:
    """``python -m benchmarks.<name> args``: its JSON, or an ``error`` entry."""
    command = [sys.executable, "-m", f"benchmarks.{name}", *args]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "command": command}
    record: dict = {"command": " ".join(command[1:]), "seconds": time.perf_counter() - start}
    if done.returncode != 0:
        return record | {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    try:
        return record | {"result": parse_json(done.stdout)}
    except ValueError as error:
        return record | {"error": str(error), "stdout_tail": done.stdout[-2000:]}


def lookup(data: dict, path: str):
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def status(value, target, op) -> str:
    if not isinstance(value, int | float) or target is None:
        return ""
    ok = value <= target if op == "<=" else value >= target
    return "ok" if ok else "MISSED"


def _shape_rows(name: str, result: dict) -> list[list[str]]:
    """Numeric shapes-world figures (flattened), or the reason they were skipped."""
    shapes = result.get("shapes", result.get("shapes_world"))
    if shapes is None:
        return []
    if isinstance(shapes, str) or "skipped" in shapes:
        reason = shapes if isinstance(shapes, str) else shapes["skipped"]
        return [[name, "shapes world", "skipped", "", "", reason[:80]]]
    rows, stack = [], [("", shapes)]
    while stack:
        prefix, node = stack.pop(0)
        for key, value in node.items():
            if isinstance(value, dict):
                stack.append((f"{prefix}{key}.", value))
            elif isinstance(value, int | float) and not isinstance(value, bool):
                rows.append([name, f"shapes: {prefix}{key}", f"{value:.3g}", "", "", ""])
    return rows[:16]


def markdown(results: dict) -> str:
    """One table: benchmark, figure, value, target, status, note."""
    rows = [["benchmark", "figure", "value", "target", "status", "note"], ["---"] * 6]
    for name, entry in results["benchmarks"].items():
        if "error" in entry:
            rows.append([name, "(failed)", "", "", "MISSED", entry["error"][:80]])
            continue
        result = entry["result"]
        for bench, path, label, target, op in FIGURES:
            value = lookup(result, path) if bench == name else None
            if bench == name and value is not None:
                shown = f"{value:.3g}" if isinstance(value, float) else str(value)
                rows.append([name, label, shown, f"{op} {target}" if target else "", status(value, target, op), ""])
        rows.extend(_shape_rows(name, result))
        rows.extend(_section_rows(name, result))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    env = results["environment"]
    header = (
        f"Profile `{results['profile']}`, {results['date']}, device {results['device']}, torch {env['torch']}, "
        f"diffusers {env['diffusers']}{', GPU ' + env['gpu'] if 'gpu' in env else ''}; total {results['seconds']:.0f} s."
    )
    return header + "\n\n" + "\n".join(lines) + "\n"


def _section_rows(name: str, result: dict) -> list[list[str]]:
    rows = []
    if name == "fastpaths":
        for controller, info in result.get("controllers", {}).items():
            rows.append([name, f"compile: {controller}", f"{info['graphs']} graph(s) / {info['steps']} steps",
                         "0 breaks", "ok" if info["graph_breaks"] == 0 else "MISSED",
                         f"{info['graph_breaks']} breaks"])  # fmt: skip
        for key, value in result.get("speed", {}).items():
            if isinstance(value, float):
                rows.append([name, key, f"{value:.3g}", "", "", ""])
    if name == "sdxl":
        for key, value in result.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                rows.append([name, key, f"{value:.4g}", "", "", ""])
    return rows


# -- sections run in this process -------------------------------------------------------------------
def fastpaths(device: str, steps: int = 3) -> dict:
    """Per controller: graphs compiled over ``steps`` timesteps and graph breaks (tiny UNet, tracing only)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from editkit.acceleration import compile_unet
    from editkit.attention import AttentionController, CrossAttentionMapStore, QKVRecorder, attach
    from editkit.testing import tiny_sd15_components

    controllers = {
        "identity": AttentionController,
        "cross_attention_map_store": lambda: CrossAttentionMapStore(grids=[(8, 8)], role="cond"),
        "qkv_recorder": lambda: QKVRecorder(keep=("key", "value")),
        "style_injection": lambda: _style_injection(unet),
    }
    result: dict = {"controllers": {}}
    for name, make in controllers.items():
        torch._dynamo.reset()
        counters.clear()
        unet = tiny_sd15_components(seed=0)["unet"].to(device)
        graphs = []
        compile_unet(unet, backend=lambda gm, inputs, seen=graphs: seen.append(gm) or gm.forward)
        controller = make()
        sample = torch.randn(2, 4, 16, 16, device=device)
        context = torch.randn(2, 77, 16, device=device)
        with torch.no_grad(), attach(unet, controller):
            controller.batch_roles = ("uncond", "cond")
            for index, t in enumerate((901, 601, 301)[:steps]):
                controller.begin_step(index, t)
                unet(sample, torch.tensor(t, device=device), encoder_hidden_states=context)
        breaks = sum(counters["graph_break"].values())
        result["controllers"][name] = {"graphs": len(graphs), "graph_breaks": breaks, "steps": steps}
    torch._dynamo.reset()
    if device == "cuda":
        result["speed"] = _compiled_speed(device)
    return result


def _style_injection(unet):
    """A style injection controller on the default sites with random features at three timesteps."""
    from editkit.style import StyleCache, StyleInjectionController, default_style_sites

    sites = default_style_sites(unet)
    modules = {name: unet.get_submodule(name) for name in sites}
    grids = {name: 16 // 2 ** (3 - int(name.split(".")[1])) for name in sites}

    def shape(site: str) -> tuple[int, ...]:
        heads = modules[site].heads
        return (1, heads, grids[site] ** 2, modules[site].to_q.out_features // heads)

    def features(names):
        return {(site, t): {n: torch.randn(shape(site)) for n in names} for site in sites for t in (901, 601, 301)}

    header = {"model": "x", "size": (128, 128), "num_inference_steps": 3, "resample_steps": 0}
    header |= {"sites": tuple(sites), "timesteps": (901, 601, 301), "final_latent": torch.zeros(1, 4, 16, 16)}
    style = StyleCache(kind="style", features=features(("key", "value")), **header)
    content = StyleCache(kind="content", features=features(("query",)), **header)
    return StyleInjectionController(sites, style, content)


def _compiled_speed(device: str) -> dict:
    """Full-size SD 1.5 UNet, fp16, 512 px, batch 2: compiled and channels_last against eager stock."""
    from benchmarks.timing import interleaved_medians
    from editkit.acceleration import compile_unet, to_channels_last
    from editkit.attention import AttentionController, attach
    from editkit.testing import full_size_sd15_unet

    def bench(unet) -> dict:
        sample = torch.randn(2, 4, 64, 64, device=device, dtype=torch.float16)
        context = torch.randn(2, 77, 768, device=device, dtype=torch.float16)
        t = torch.tensor(500, device=device)

        def stock():
            with torch.no_grad():
                unet(sample, t, encoder_hidden_states=context)

        def editkit():
            with torch.no_grad(), attach(unet, AttentionController()):
                unet(sample, t, encoder_hidden_states=context)

        return interleaved_medians({"stock": stock, "editkit": editkit}, repeats=10, warmup=2, device=device)

    eager = bench(full_size_sd15_unet(torch.float16, device))
    compiled = bench(compile_unet(full_size_sd15_unet(torch.float16, device)))
    nhwc = bench(to_channels_last(full_size_sd15_unet(torch.float16, device)))
    torch._dynamo.reset()
    base = eager["stock"]["median_s"]
    return {
        "eager_editkit_vs_stock": eager["editkit"]["median_s"] / base,
        "compiled_stock_speedup": base / compiled["stock"]["median_s"],
        "compiled_editkit_speedup": base / compiled["editkit"]["median_s"],
        "compiled_editkit_vs_compiled_stock": compiled["editkit"]["median_s"] / compiled["stock"]["median_s"],
        "channels_last_editkit_speedup": base / nhwc["editkit"]["median_s"],
        "times": {"eager": eager, "compiled": compiled, "channels_last": nhwc},
    }


def sdxl(device: str, steps: int = 50) -> dict:
    """SDXL architecture (random weights), fp16, 1024 px, CFG: seconds per image and peak memory (CUDA)."""
    if device != "cuda":
        return {"skipped": "SDXL at 1024 px is measured on CUDA only (the CPU figure is benchmarks.memory_estimate)"}
    from diffusers import UNet2DConditionModel

    from benchmarks.memory_estimate import SDXL_UNET_CONFIG
    from benchmarks.timing import interleaved_medians, peak_memory
    from editkit.attention import AttentionController, CrossAttentionMapStore, attach

    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(torch.float16).eval().requires_grad_(False)
    sample = torch.randn(2, 4, 128, 128, device=device, dtype=torch.float16)
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 77, 2048, device=device, dtype=torch.float16),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, device=device, dtype=torch.float16),
                              "time_ids": torch.randn(2, 6, device=device, dtype=torch.float16)},
    }  # fmt: skip

    def image(controller=None):
        def run():
            with torch.no_grad(), attach(unet, controller) if controller else _null():
                for index in range(steps):
                    if controller:
                        controller.begin_step(index, 999 - index * 20)
                    unet(sample, torch.tensor(999 - index * 20, device=device), **kwargs)

        return run

    runs = {"plain": image(), "editkit_identity": image(AttentionController()),
            "editkit_maps_32x32": image(CrossAttentionMapStore(grids=[(32, 32)]))}  # fmt: skip
    times = interleaved_medians(runs, repeats=2, warmup=1, device=device)
    result = {f"seconds_per_image_{k}": v["median_s"] for k, v in times.items()}
    result |= {f"peak_gb_{k}": peak_memory(run, device) / 1e9 for k, run in runs.items()}
    result["identity_vs_plain"] = times["editkit_identity"]["median_s"] / times["plain"]["median_s"]
    result["steps"] = steps
    return result


def _null():
    import contextlib

    return contextlib.nullcontext()


# -- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--quick", action="store_const", dest="profile", const="quick", help="CPU profile")
    profile.add_argument("--cuda", action="store_const", dest="profile", const="cuda", help="CUDA profile")
    profile.add_argument("--smoke", action="store_const", dest="profile", const="smoke", help="smallest sizes")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/out/results.json"))
    parser.add_argument("--only", nargs="*", help="benchmarks/sections to run (default: all)")
    parser.add_argument("--skip-shapes", action="store_true", help="skip shapes-world parts that have a flag")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    parser.add_argument("--section", choices=("fastpaths", "sdxl"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.section:  # one in-process section, run as a subprocess by the suite
        from benchmarks.timing import print_json

        print_json(fastpaths(device) if args.section == "fastpaths" else sdxl(device))
        return
    name = args.profile or ("cuda" if device == "cuda" else "quick")
    if name == "cuda" and device != "cuda":
        parser.error("the CUDA profile needs a CUDA GPU")
    plan = {k: v + (SHAPES_FLAGS.get(k, []) if args.skip_shapes else []) for k, v in PROFILES[name].items()}
    sections = {"fastpaths": ["--section", "fastpaths"], "sdxl": ["--section", "sdxl"]}
    start = time.perf_counter()
    results = {"profile": name, "device": device, "date": datetime.date.today().isoformat(),
               "environment": environment(), "benchmarks": {}}  # fmt: skip
    for bench, bench_args in [*plan.items(), *sections.items()]:
        if args.only and bench not in args.only:
            continue
        module = "run" if bench in sections else bench
        print(f"[run] {bench} ...", file=sys.stderr, flush=True)
        results["benchmarks"][bench] = run_benchmark(module, bench_args, args.timeout)
        entry = results["benchmarks"][bench]
        print(f"[run] {bench}: {entry.get('error', 'ok')} ({entry.get('seconds', 0):.0f} s)", file=sys.stderr)
        results["seconds"] = time.perf_counter() - start
        write_outputs(results, args.output)  # after each benchmark: a killed run keeps what finished
    sys.stdout.write(markdown(results))


def write_outputs(results: dict, output: Path) -> None:
    """The JSON document and the Markdown table beside it (``.md``), written atomically."""
    from editkit.image import atomic_write

    table = markdown(results)
    atomic_write(output, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)), overwrite=True)
    atomic_write(output.with_suffix(".md"), lambda tmp: Path(tmp).write_text(table), overwrite=True)


if __name__ == "__main__":
    main()
