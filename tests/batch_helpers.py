"""What the batch tests share: a tiny img2img workflow, a folder of small photos, and one-by-one reference runs."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parent / "data"


def img2img_workflow(folder: Path, checkpoint: Path) -> Path:
    """A 32x32 img2img workflow, 2 steps, on a tiny checkpoint."""
    path = folder / "img2img.json"
    path.write_text(json.dumps({"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(checkpoint)}},
        "photo": {"type": "LoadImage", "params": {"path": str(DATA / "chelsea_128.png")}},
        "resize": {"type": "ImageResize", "inputs": {"image": "photo.image"},
                   "params": {"width": 32, "height": 32, "keep_aspect": False}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a cat"}},
        "enc": {"type": "VAEEncode", "inputs": {"vae": "ckpt.vae", "image": "resize.image"}},
        "sample": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                                 "latent": "enc.latent"},
                   "params": {"seed": 1, "steps": 2, "strength": 0.6}},
        "dec": {"type": "VAEDecode", "inputs": {"vae": "ckpt.vae", "latent": "sample.latent"}},
        "save": {"type": "SaveImage", "inputs": {"image": "dec.image"}, "params": {"prefix": "cat"}}}}))
    return path


def photo_folder(folder: Path) -> Path:
    """Two small photos (and a text file, which a folder sweep leaves out)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut_96.png", "chelsea_128.png"):
        Image.open(DATA / name).convert("RGB").resize((48, 48)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@contextlib.contextmanager
def torch_threads(count: int):
    """CPU reductions depend on the thread count: references run with the workers' count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_by_one(workflow: Path, jobs: list[dict], out: Path, threads: int = 1) -> list[np.ndarray]:
    """Each job run alone, by a fresh Engine per job (nothing shared between runs), as the images it saved."""
    from nodegraph.api import Engine

    images = []
    with torch_threads(threads):
        for i, overrides in enumerate(jobs):
            result = Engine(cache_dir=False).run(workflow, overrides=overrides, out_dir=out / str(i))
            assert len(result.files) == 1
            images.append(pixels(result.files[0]))
    return images


def batch_images(out: Path) -> list[np.ndarray]:
    """The images a batch saved, in job order, from its results.jsonl."""
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    records.sort(key=lambda r: r["index"])
    assert all(r["status"] == "done" and len(r["files"]) == 1 for r in records), records
    return [pixels(out / r["files"][0]) for r in records]
