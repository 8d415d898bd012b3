"""Image folders and image files: load, resize + centre-crop, and write PNGs and grids atomically.

Pixels are float tensors in [-1, 1], shape [3, H, W], everywhere in dsfuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from dsfuse.errors import InputError, UsageError
from dsfuse.io import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def find_images(root: str | Path) -> list[Path]:
    """Image files under `root`, searched recursively, sorted."""
    root = Path(root)
    if not root.exists():
        raise UsageError("folder not found", root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_rgb(path: str | Path) -> Image.Image:
    """Open any image as RGB (grayscale, palette and RGBA converted; EXIF rotation applied)."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"not a readable image ({type(e).__name__})", path) from None


def to_tensor(im: Image.Image, size: int | None = None) -> torch.Tensor:
    """PIL RGB -> [3, S, S] in [-1, 1]; resized (short side to S) and centre-cropped when `size` is given."""
    x = TF.pil_to_tensor(im)
    if size is not None:
        x = TF.center_crop(TF.resize(x, size, antialias=True), [size, size])
    return x.float().div(127.5).sub(1.0)


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    return to_tensor(read_rgb(path), size)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels."""
    return x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()


def save_png(x: torch.Tensor, path: str | Path) -> Path:
    """Write one [3, H, W] image in [-1, 1] as a PNG, atomically."""
    image = Image.fromarray(to_uint8(x).permute(1, 2, 0).numpy())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """[B, 3, H, W] -> one [3, H', W'] grid image in [-1, 1]."""
    from torchvision.utils import make_grid as tv_make_grid

    nrow = nrow or math.ceil(math.sqrt(len(images)))
    return tv_make_grid(images.detach().float().cpu(), nrow=nrow, padding=padding, pad_value=1.0)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    return save_png(make_grid(images, nrow), path)


@dataclass
class ImageFolder(Dataset):
    """Images under `root` at `size` px; with `class_folders`, labels come from the first-level folders.

    Unreadable files are skipped and counted in `skipped` (checked once, at construction).
    """

    root: Path
    size: int
    class_folders: bool = False
    files: list[Path] = field(init=False)
    labels: list[int] = field(init=False)
    classes: list[str] = field(init=False)
    skipped: list[Path] = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise UsageError("not a folder of images", self.root)
        candidates = find_images(self.root)
        self.files, self.skipped = [], []
        for path in candidates:
            try:
                with Image.open(path) as im:
                    im.verify()
                self.files.append(path)
            except Exception:
                self.skipped.append(path)
        if not self.files:
            raise UsageError("no readable images found (jpg, png, webp, bmp)", self.root)
        if self.class_folders:
            names = [p.relative_to(self.root).parts[0] if len(p.relative_to(self.root).parts) > 1 else ""
                     for p in self.files]
            if "" in names:
                raise UsageError("class-conditional data needs one folder per class; found loose images", self.root)
            self.classes = sorted(set(names))
            self.labels = [self.classes.index(n) for n in names]
        else:
            self.classes, self.labels = [], [0] * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.files[i], self.size), self.labels[i]
