"""An SD 1.5-sized fp16 single file loaded as float32 in a fresh process: ours vs diffusers' from_single_file.

    PYTHONPATH=. python benchmarks/loading.py --sd15-dir /tmp/sd15bench [--repeat 3] [--steps 4]

The file: the real SD 1.5 architecture (UNet 320/640/1280/1280, 768-wide CLIP text encoder; configs in
tests/tiny_models.py) with random weights, saved as float16 (about 2 GB) with its weightless config folder
beside it. It is built once into --sd15-dir and reused by later runs.

Each side runs in its own fresh process and loads the file as float32 on CPU, then encodes the prompt and
the empty negative and samples a 64x64 latent with Euler:
  - ours: the workflow LoadCheckpoint -> CLIPEncode -> EmptyLatent -> Sampler through the Engine (disk
    cache off), with what LoadCheckpoint needs imported first (as the other side imports its pipeline), so
    that the imports and the load compare side by side;
  - ours as `nodegraph run` does it (a third process in each round): LoadCheckpoint imports diffusers
    itself while the file is being read; only its time to the first step is reported;
  - diffusers: StableDiffusionPipeline.from_single_file(path, config=..., torch_dtype=torch.float32,
    local_files_only=True), then the pipeline with output_type="latent".
Per process: the whole time from spawning it to the end of the first sampler step (interpreter start,
imports, load, prompt encoding, one step), the load alone, the step time after the first, the RSS after
imports and the peak RSS (ru_maxrss). The processes run in interleaved rounds (which side goes first
rotates) after one warm-up round that is not counted; each figure is the median ratio ours/diffusers
over the rounds, with its min-max. Also the float32 model size (the sum of its parameters' bytes) and the
peak RSS over it: targets (peak - RSS after imports) / model <= 1.10 and fresh process ours/diffusers
<= 1.0x. CPU only (no GPU here).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILE_NAME = "sd15-random-fp16.safetensors"
PROMPT = "concept art digital painting of an elven castle, inspired by lord of the rings, highly detailed, 8k"
GIB = 1024**3


def build(folder: Path) -> Path:
    """The fp16 file and its config folder, built once. Built in a side folder and moved in at the end, so a
    build that was cut short is never taken for a finished one."""
    path = folder / FILE_NAME
    if path.exists():
        return path
    import torch

    sys.path.insert(0, str(REPO))
    from tests.tiny_models import build_single_file, sd15_configs

    work = folder / ".building"
    shutil.rmtree(work, ignore_errors=True)
    built, config = build_single_file(work / FILE_NAME, configs=sd15_configs(), dtype=torch.float16)
    shutil.rmtree(path.with_suffix(".config"), ignore_errors=True)
    config.rename(path.with_suffix(".config"))
    built.rename(path)  # last: the file's presence means the build finished
    shutil.rmtree(work, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------- children

def quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def param_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class Steps:
    """Wall-clock times at the end of each sampler step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def mark(self) -> None:
        self.ends.append(time.time())

    def after_first(self) -> float:
        """Median step time after the first (the first also pays for warming the kernels up)."""
        return statistics.median(b - a for a, b in zip(self.ends, self.ends[1:]))


def child_ours(path: str, steps: int, spawned: float, preimport: bool = True) -> dict:
    """``preimport``: import what LoadCheckpoint needs before the run, as the other side imports its pipeline,
    so that "load" is reading the file and building the models on both sides. Without it the process does
    what `nodegraph run` does: LoadCheckpoint imports diffusers itself while the file is being read."""
    quiet()
    from nodegraph.api import Engine
    from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint

    engine = Engine(cache_dir=False)  # a disk cache would serve the sampler's result from an earlier process
    import torch
    if preimport:
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
        from diffusers.loaders.single_file import load_single_file_sub_model  # noqa: F401
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    imported, baseline = time.time(), rss_now()
    workflow = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": path, "dtype": "float32"}},
        # no negative linked: the sampler uses the empty prompt, encoded once, as the pipeline does with none
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": PROMPT}},
        "empty": {"type": "EmptyLatent", "params": {"width": 64, "height": 64}},
        "t2i": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                               "latent": "empty.latent"},
                "params": {"seed": 0, "steps": steps, "scheduler": "euler"}},
    }}
    marks = Steps()
    result = engine.run(workflow, targets=["t2i"], out_dir=tempfile.gettempdir(),
                        progress=lambda event: marks.mark() if event.node_id == "t2i" else None)
    peak = peak_rss()
    model, clip, vae = load_checkpoint(inspect_checkpoint(path), torch.float32)  # the handles the run loaded
    return {"to_first_step_s": marks.ends[0] - spawned, "imports_s": imported - spawned,
            "load_s": result.nodes["ckpt"].seconds, "step_s": marks.after_first(), "rss_after_imports": baseline,
            "peak_rss": peak, "model_bytes": param_bytes(model.unet, clip.text_encoder, vae.vae)}


def child_diffusers(path: str, steps: int, spawned: float) -> dict:
    quiet()
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    imported, baseline = time.time(), rss_now()
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(path, config=str(Path(path).with_suffix(".config")),
                                                    torch_dtype=torch.float32, local_files_only=True,
                                                    safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
    load = time.perf_counter() - start
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    marks = Steps()

    def on_step(pipeline, i, t, kwargs):
        marks.mark()
        return kwargs

    pipe(PROMPT, num_inference_steps=steps, height=64, width=64, generator=torch.Generator().manual_seed(0),
         output_type="latent", callback_on_step_end=on_step)
    return {"to_first_step_s": marks.ends[0] - spawned, "imports_s": imported - spawned, "load_s": load,
            "step_s": marks.after_first(), "rss_after_imports": baseline, "peak_rss": peak_rss(),
            "model_bytes": param_bytes(pipe.unet, pipe.text_encoder, pipe.vae)}


# ---------------------------------------------------------------------------------------------- parent

def spawn(side: str, path: Path, steps: int) -> dict:
    spawned = time.time()  # the child's clock starts here: interpreter start-up counts
    proc = subprocess.run([sys.executable, __file__, "--child", side, str(path), "--steps", str(steps),
                           "--spawned", repr(spawned)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the {side} process failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(folder: Path, repeat: int, steps: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # in its own process, so that this one never holds the float32 model it is made from
    subprocess.run([sys.executable, __file__, "--build", str(folder)], cwd=REPO, check=True)
    path = folder / FILE_NAME
    build_s = time.perf_counter() - start
    with open(path, "rb") as f:  # both sides find the file in the OS page cache, none pays the disk first
        while f.read(64 * 1024**2):
            pass
    sides = ("ours", "diffusers", "ours-cli")
    for side in sides:  # warm-up: imports' files cached too
        spawn(side, path, steps)
    runs = {side: [] for side in sides}
    for i in range(repeat):  # each side goes first, second and third in turn
        for side in sides[i % 3:] + sides[:i % 3]:
            runs[side].append(spawn(side, path, steps))
    return {"file_gib": path.stat().st_size / GIB, "build_s": build_s, "steps": steps, "runs": runs}


def summary(ours: list[float], ref: list[float]) -> dict:
    """Medians of each side and of the per-pair ratios ours/ref, with the ratios' min and max."""
    ratios = [o / r for o, r in zip(ours, ref)]
    return {"ours": statistics.median(ours), "ref": statistics.median(ref), "ratio": statistics.median(ratios),
            "min": min(ratios), "max": max(ratios), "n": len(ratios)}


def verdict(value: float, target: float | None, unit: str = "x") -> str:
    return "" if target is None else f"  target <= {target:.2f}{unit}: {'met' if value <= target else 'NOT met'}"


def machine(load_at_start: float) -> str:
    """How busy the machine was: other processes on a core slow torch's threads down many times over."""
    return (f"1-minute load average {load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end, "
            f"on {os.cpu_count()} cores")


def report(data: dict) -> str:
    ours, ref = data["runs"]["ours"], data["runs"]["diffusers"]
    model = ours[0]["model_bytes"]
    assert all(r["model_bytes"] == model for r in ours + ref), "the two sides built different models"
    lines = [f"SD 1.5-sized random checkpoint, one fp16 single file ({data['file_gib']:.2f} GiB) loaded as float32, "
             f"CPU, 64x64, {data['steps']} Euler steps, each run a fresh process; median over "
             f"{len(ours)} interleaved rounds (min-max of the per-round ratio), after one warm-up round",
             f"  {'':34s} {'ours':>9s} {'diffusers':>10s}   ratio ours/diffusers"]

    def row(title, key, unit, scale=1.0, target=None, fmt=".2f"):
        s = summary([r[key] / scale for r in ours], [r[key] / scale for r in ref])
        lines.append(f"  {title:34s} {s['ours']:9{fmt}} {s['ref']:10{fmt}} {unit:4s} {s['ratio']:.3f}x "
                     f"({s['min']:.3f}-{s['max']:.3f}){verdict(s['ratio'], target)}")

    row("spawn to end of first step", "to_first_step_s", "s", target=1.0)
    cli = summary([r["to_first_step_s"] for r in data["runs"]["ours-cli"]], [r["to_first_step_s"] for r in ref])
    lines.append(f"  {'  the same, as `nodegraph run` does':34s} {cli['ours']:9.2f} {cli['ref']:10.2f} s    "
                 f"{cli['ratio']:.3f}x ({cli['min']:.3f}-{cli['max']:.3f}){verdict(cli['ratio'], 1.0)}")
    row("  of which imports (+ start-up)", "imports_s", "s")
    row("  of which load", "load_s", "s")
    row("step after the first", "step_s", "s", fmt=".3f")
    row("RSS after imports", "rss_after_imports", "GiB", GIB)
    row("peak RSS", "peak_rss", "GiB", GIB)
    for r in ours + ref:
        r["model_peak"] = r["peak_rss"] - r["rss_after_imports"]
    row("peak RSS - RSS after imports", "model_peak", "GiB", GIB)
    lines.append(f"  float32 model (sum of parameter bytes): {model / GIB:.2f} GiB")
    for side, runs in (("ours", ours), ("diffusers", ref)):
        over = [r["model_peak"] / model for r in runs]
        absolute = [r["peak_rss"] / model for r in runs]
        lines.append(f"  {side:9s} (peak - RSS after imports) / model {statistics.median(over):.3f} "
                     f"({min(over):.3f}-{max(over):.3f}); absolute peak / model {statistics.median(absolute):.3f}"
                     + (verdict(statistics.median(over), 1.10, "") if side == "ours" else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15-dir", default=os.path.join(tempfile.gettempdir(), "nodegraph-sd15-fp16"),
                        help="where the 2 GB fp16 file is built once and reused")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved pairs of fresh processes")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(Path(args.build))
    elif args.child:
        side, path = args.child
        child = {"ours": child_ours, "diffusers": child_diffusers,
                 "ours-cli": lambda *a: child_ours(*a, preimport=False)}[side]
        print(json.dumps(child(path, args.steps, args.spawned)))
    else:
        load = os.getloadavg()[0]
        data = measure(Path(args.sd15_dir), args.repeat, args.steps)
        if args.json:
            print(json.dumps(data, indent=2))
        print(report(data))
        print(f"No GPU was available: CPU figures. {machine(load)}.")


if __name__ == "__main__":
    main()
