"""Captioned images: reading a folder of images with a caption each, and a generated set of shapes whose
captions name their attributes (shape, colour, size, position).

A folder holds `x.png` + `x.txt` pairs, or a `captions.jsonl` of {"image": "x.png", "caption": "..."}.
The generated set keeps some (shape, colour) pairs out of `train/`: they appear only in `heldout/`, so a
model's captions and images there show whether it composes attributes it never saw together.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dsfuse.choices import CaptionOrder
from dsfuse.data.images import find_images
from dsfuse.errors import UsageError
from dsfuse.io import atomic_path, write_text

CAPTIONS_FILE = "captions.jsonl"

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (230, 40, 40), "orange": (245, 140, 20), "yellow": (240, 225, 40), "green": (40, 200, 60),
           "cyan": (40, 210, 220), "blue": (50, 90, 240), "purple": (150, 60, 230), "white": (235, 235, 235)}
SIZES = {"small": 0.17, "large": 0.3}  # radius as a share of the image side
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS)}


# A caption names the shape first by default: a decoder that names the colour first predicts the shape
# after it, and for a held-out pair its language prior (this colour never came with this shape) wins over
# the image (bench/unified.py --captions measures both).
CAPTIONS: dict[CaptionOrder, str] = {"shape-first": "a {shape}, {size} and {colour}, at the {position}",
                                     "colour-first": "a {size} {colour} {shape} at the {position}"}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str

    def caption(self, order: CaptionOrder = "shape-first") -> str:
        return CAPTIONS[order].format(**dataclasses.asdict(self))


def held_out(shape: str, colour: str) -> bool:
    """The (shape, colour) pairs never shown in training: each colour with one shape, so that every shape
    is seen in most colours but not all."""
    return (SHAPES.index(shape) + list(COLOURS).index(colour)) % len(SHAPES) == 0


def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption names (None where it names none, or several)."""
    words = " ".join(re.findall(r"[a-z]+", text.lower()))
    found = {}
    for name, options in ATTRIBUTES.items():
        hits = [o for o in options if f" {o} " in f" {words} "]
        found[name] = hits[0] if len(hits) == 1 else None
    return found


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """The scene on a dark, slightly noisy background: uint8 [size, size, 3]."""
    background = rng.normal(30, 6, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[scene.position]
    cx, cy = (np.array([fx, fy]) + rng.uniform(-0.04, 0.04, size=2)) * size
    r = SIZES[scene.size] * size * rng.uniform(0.9, 1.1)
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif scene.shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    return np.asarray(image)


def write_captioned_set(out: Path, n_train: int, n_heldout: int, size: int, seed: int,
                        order: CaptionOrder = "shape-first") -> dict[str, int]:
    """OUT/train/NNNNN.png + .txt (every attribute combination but the held-out pairs) and OUT/heldout/
    (only those pairs) with a captions.jsonl; `out` must be a claimed, empty folder."""
    rng = np.random.default_rng(seed)
    every = [Scene(*combo) for combo in itertools.product(*ATTRIBUTES.values())]
    splits = {"train": ([s for s in every if not held_out(s.shape, s.colour)], n_train),
              "heldout": ([s for s in every if held_out(s.shape, s.colour)], n_heldout)}
    for split, (scenes, count) in splits.items():
        folder = out / split
        folder.mkdir()
        records = []
        rounds = -(-count // len(scenes))  # every combination once per round, in a shuffled order
        picks = np.concatenate([rng.permutation(len(scenes)) for _ in range(rounds)] or [[]]).astype(int)[:count]
        for i, pick in enumerate(picks):
            scene = scenes[pick]
            name = f"{i:05d}.png"
            with atomic_path(folder / name) as tmp:
                Image.fromarray(render(scene, size, rng)).save(tmp, format="PNG")
            if split == "train":
                write_text(folder / f"{i:05d}.txt", scene.caption(order) + "\n")
            records.append({"image": name, "caption": scene.caption(order)})
        if split == "heldout":
            write_text(folder / CAPTIONS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    return {split: count for split, (_, count) in splits.items()}


# --------------------------------------------------------------------------- reading a captioned folder

@dataclass
class CaptionedFolder:
    images: list[Path]
    captions: list[str]
    uncaptioned: list[Path]  # images without a caption (skipped)


def read_captioned(root: Path) -> CaptionedFolder:
    """The images of `root` and their captions, from captions.jsonl when there is one, else x.txt beside
    x.png. An unusable captions.jsonl, or a folder with no captioned image, is a UsageError."""
    if root.is_file():
        raise UsageError("expected a folder of captioned images", root)
    images = find_images(root)
    listed = root / CAPTIONS_FILE
    if listed.is_file():
        captions = _jsonl_captions(listed)
    else:
        captions = {p.resolve(): text for p in images if (text := _read_caption(p.with_suffix(".txt")))}
    kept = [p for p in images if p.resolve() in captions]
    if not kept:
        raise UsageError(f"no captioned images (x.png with x.txt, or a {CAPTIONS_FILE})", root)
    return CaptionedFolder(kept, [captions[p.resolve()] for p in kept],
                           [p for p in images if p.resolve() not in captions])


def _read_caption(path: Path) -> str:
    """The caption in `path`, one line of single spaces; "" when there is none."""
    if not path.is_file():
        return ""
    try:
        return " ".join(path.read_text(encoding="utf-8").split())
    except (UnicodeDecodeError, OSError):
        return ""


def _jsonl_captions(path: Path) -> dict[Path, str]:
    captions = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError("not UTF-8 text", path) from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, caption = record["image"], record["caption"]
        except (json.JSONDecodeError, TypeError, KeyError):
            raise UsageError(f'line {number} is not a JSON object with "image" and "caption"', path) from None
        if not isinstance(image, str) or not isinstance(caption, str):
            raise UsageError(f'line {number}: "image" and "caption" must be strings', path)
        if " ".join(caption.split()):
            captions[(path.parent / image).resolve()] = " ".join(caption.split())
    return captions
