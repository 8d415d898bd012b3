"""Random crops of a few photos: many training views from a small folder of images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from dsfuse.data.images import ImageFolder, read_rgb, to_tensor


@dataclass
class RandomCrops(Dataset):
    """`views` random square crops (a `min_scale`..1 share of the short side, flipped half the time) of
    the images under `root`, resized to `size` px. Randomness comes from torch's global RNG, so
    `--resume` repeats it exactly."""

    root: Path
    size: int
    views: int = 1000
    min_scale: float = 0.4
    images: list[torch.Tensor] = field(init=False)
    skipped: list[Path] = field(init=False)

    def __post_init__(self) -> None:
        folder = ImageFolder(self.root, self.size)  # finds readable images and counts the rest
        self.skipped = folder.skipped
        # Decoded once at a working size a little above `size`, so a crop still has detail to resize.
        self.images = [to_tensor(read_rgb(p), round(self.size / self.min_scale)) for p in folder.files]

    def __len__(self) -> int:
        return self.views

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.images[i % len(self.images)]
        side = image.shape[-1]
        crop = int(side * (self.min_scale + (1 - self.min_scale) * torch.rand(()).item()))
        top, left = (int(torch.randint(0, side - crop + 1, ())) for _ in range(2))
        view = TF.resize(image[:, top:top + crop, left:left + crop], [self.size, self.size], antialias=True)
        return view.flip(-1) if torch.rand(()) < 0.5 else view
