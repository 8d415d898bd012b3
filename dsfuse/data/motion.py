"""A labelled synthetic video dataset: the class is the direction a shape moves, so no single frame tells it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsfuse.data.media import write_video
from dsfuse.data.synth import DIRECTIONS, moving_shape_clip, tone

# The same pitches as samples/video: with --audio the soundtrack names the class too (for fusion).
DIRECTION_TONE_HZ = {"left": 330.0, "right": 440.0, "up": 554.0, "down": 659.0}
AUDIO_RATE = 16000


def write_motion_dataset(root: str | os.PathLike, per_class: int, frames: int = 24, size: int = 64,
                         fps: float = 12.0, audio: bool = False, seed: int = 0, progress: bool = False) -> list[Path]:
    """Write `per_class` mp4 clips per direction to ROOT/<direction>/<direction>_NNN.mp4; returns the files."""
    if per_class < 1 or frames < 1 or size < 8 or fps <= 0:
        raise ValueError(f"need per_class >= 1, frames >= 1, size >= 8, fps > 0; got {per_class}, {frames}, {size}, {fps}")
    rng = np.random.default_rng(seed)
    written = []
    jobs = [(index, direction) for index in range(per_class) for direction in DIRECTIONS]  # any prefix is balanced
    for index, direction in tqdm(jobs, desc="videos", disable=not progress, leave=False, file=sys.stderr):
        clip = moving_shape_clip(direction, frames, size, rng)
        sound = tone(DIRECTION_TONE_HZ[direction], frames / fps, AUDIO_RATE, rng) if audio else None
        path = Path(root) / direction / f"{direction}_{index:03d}.mp4"
        written.append(write_video(path, clip, fps, sound, AUDIO_RATE))
    return written
