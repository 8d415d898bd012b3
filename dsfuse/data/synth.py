"""Synthetic samples: shape images, clips of a moving shape, tones. Pure numpy, no file I/O,
deterministic given the numpy Generator passed in.
"""

from __future__ import annotations

import colorsys

import einops
import numpy as np
from PIL import Image, ImageDraw

DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y grows down


def _bright_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour of random hue, so shapes stand out from greyish backgrounds."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _gradient(size: int, rng: np.random.Generator) -> np.ndarray:
    """A linear blend between two random colours along a random direction: float [size, size, 3] in 0-255."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle)
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    start, end = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    return einops.rearrange(t, "h w -> h w 1") * (end - start) + start


def _draw_shape(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    """One random circle, rectangle or triangle, partly allowed off the edge."""
    kind = rng.choice(("circle", "rectangle", "triangle"))
    cx, cy = rng.uniform(0, size, size=2)
    r = rng.uniform(0.08, 0.25) * size
    colour = _bright_colour(rng)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "rectangle":
        w, h = rng.uniform(0.5, 1.0, size=2) * r
        draw.rectangle((cx - w, cy - h, cx + w, cy + h), fill=colour)
    else:
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=colour)


def shapes_image(size: int, rng: np.random.Generator) -> np.ndarray:
    """A few random coloured circles, rectangles and triangles on a gradient: uint8 [size, size, 3]."""
    image = Image.fromarray(_gradient(size, rng).round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 6)):
        _draw_shape(draw, size, rng)
    return np.asarray(image).copy()


def _shape_mask(kind: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Anti-aliased coverage [size, size] in [0, 1] of a disc or square at a sub-pixel centre."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = np.abs(xs - cx), np.abs(ys - cy)
    dist = np.hypot(dx, dy) if kind == "disc" else np.maximum(dx, dy)
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)  # a one-pixel ramp: smooth sub-pixel motion


def _path(frames: int, size: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Positions [T] along one axis at a random steady speed, from a random start that keeps the shape inside."""
    room = size - 2 * radius  # how far the centre may travel
    travel = rng.uniform(0.35, 0.9) * room
    return radius + rng.uniform(0, room - travel) + np.linspace(0.0, travel, frames)


def _trajectory(direction: str, frames: int, size: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Centres [T, 2] (x, y) for a shape moving `direction`."""
    dx, dy = _STEP[direction]
    along = _path(frames, size, radius, rng)
    if dx < 0 or dy < 0:  # moving towards 0: the same positions, backwards
        along = along[::-1]
    # the fixed coordinate is drawn like a point on another path, so a single frame's position
    # has the same distribution on both axes and gives away neither the axis nor the sense
    across = np.full(frames, _path(frames, size, radius, rng)[rng.integers(frames)])
    return np.stack([along, across] if dx != 0 else [across, along], axis=1)


def moving_shape_clip(direction: str, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A disc or square moving steadily `direction` over a noisy background: uint8 [T, size, size, 3].

    The start, speed, colour and size are random, so only the motion across frames tells the direction.
    """
    if direction not in _STEP:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    kind = rng.choice(("disc", "square"))
    radius = rng.uniform(0.1, 0.18) * size
    colour = np.array(_bright_colour(rng), dtype=np.float32)
    # a static grey texture plus fresh sensor noise every frame: no frame is the same as the last
    grey = rng.uniform(60, 190) + rng.normal(0, 18, size=(size, size, 1))
    background = np.repeat(grey, 3, axis=2) + rng.normal(0, 6, size=(size, size, 3))
    clip = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t, (cx, cy) in enumerate(_trajectory(direction, frames, size, radius, rng)):
        alpha = einops.rearrange(_shape_mask(kind, size, cx, cy, radius), "h w -> h w 1")
        noisy = background + rng.normal(0, 4, size=background.shape)
        clip[t] = np.clip(alpha * colour + (1 - alpha) * noisy, 0, 255).round().astype(np.uint8)
    return clip


def tone(freq_hz: float, seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A sine at `freq_hz` with soft random attack/release, a slight tremolo and light noise: float32 [n]."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    phase = rng.uniform(0, 2 * np.pi)
    attack, release = rng.uniform(0.01, 0.05, size=2) * sample_rate
    ramp_up = np.clip(np.arange(n) / max(attack, 1), 0, 1)
    ramp_down = np.clip((n - 1 - np.arange(n)) / max(release, 1), 0, 1)  # no click at either end
    tremolo = 1 + rng.uniform(0.02, 0.1) * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 2 * np.pi))
    amplitude = rng.uniform(0.3, 0.5)
    signal = amplitude * ramp_up * ramp_down * tremolo * np.sin(2 * np.pi * freq_hz * t + phase)
    return np.clip(signal + rng.normal(0, 0.005, size=n), -1, 1).astype(np.float32)
