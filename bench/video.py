"""Video decoding and classification speed on this machine.

1. Per backbone: clips/s for decoding alone (PyAV, seeking, scaled while decoding) and for decoding +
   the model, on a 10 s 320x240 video; reference: decoding alone, in the same run.
2. Decode time for 3 clips from videos of 10 s, 1 min and 10 min (tiny 64x64 frames, so making them
   is fast); reference: decoding every frame of the same file, in the same run. Seeking should make
   the 10 min video cost about what the 1 min one does.

Test videos are cached in the temp folder between runs.

    python bench/video.py                          # small3d and the three ResNet-style backbones
    python bench/video.py --backbones all --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dsfuse, installed or not

from dsfuse.data.synth import moving_shape_clip  # noqa: E402
from dsfuse.data.video import probe_video, read_all_frames, read_clips  # noqa: E402
from dsfuse.device import select_device  # noqa: E402
from dsfuse.io import atomic_path  # noqa: E402
from dsfuse.models.video import BACKBONES, VideoClassifier, VideoConfig  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "dsfuse-bench-video"
FPS = 25


def make_video(path: Path, seconds: float, size: tuple[int, int]) -> Path:
    """A moving-shape video of `seconds` at 25 fps (x264 defaults: a keyframe at least every 250 frames)."""
    if path.exists():
        return path
    h, w = size
    loop = moving_shape_clip("right", 50, max(h, w), np.random.default_rng(0))[:, :h, :w]  # 2 s, repeated
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for index in range(round(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(loop[index % len(loop)]), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timings after one warm-up call: on a shared machine, the least disturbed."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_backbones(names: list[str], device: torch.device, clips: int, repeats: int) -> Table:
    video = make_video(CACHE / "clip_10s_320x240.mp4", 10.0, (240, 320))
    table = Table(title=f"decode + model, {clips} clips of a 10 s 320x240 video on {device} "
                        f"({torch.get_num_threads()} threads)", title_justify="left")
    for column in ("backbone", "frames x crop", "decode clips/s (reference)", "decode + model clips/s",
                   "model share of time"):
        table.add_column(column)
    for name in names:
        config = VideoConfig.for_backbone(name, num_classes=400)
        model = VideoClassifier(config).to(device).eval()

        def decode() -> torch.Tensor:
            return read_clips(video, config.frames, config.fps, clips, config.decode_size)

        @torch.no_grad()
        def decode_and_classify() -> torch.Tensor:
            logits = model(model.preprocess(decode().to(device)))
            if device.type == "cuda":
                torch.cuda.synchronize()
            return logits

        decode_s = best_time(decode, repeats)
        total_s = best_time(decode_and_classify, repeats)
        share = 1 - decode_s / total_s
        table.add_row(name, f"{config.frames} x {config.crop}", f"{clips / decode_s:.1f}", f"{clips / total_s:.2f}",
                      f"{share:.0%}" if share > 0 else "within noise")
        del model
    return table


def bench_long_videos(repeats: int) -> Table:
    table = Table(title="3 clips of 16 frames at 15 fps from videos of growing length (64x64, 25 fps)",
                  title_justify="left")
    for column in ("video", "3 clips, seeking (s)", "decode every frame (s, reference)", "speed-up",
                   "vs 1 min"):
        table.add_column(column)
    one_minute = None
    for label, seconds in (("10 s", 10), ("1 min", 60), ("10 min", 600)):
        path = make_video(CACHE / f"long_{seconds}s_64.mp4", seconds, (64, 64))
        assert abs(probe_video(path).duration - seconds) < 1
        clips_s = best_time(lambda: read_clips(path, 16, 15.0, 3, 64), 4 * repeats)  # cheap: more repeats
        whole_s = best_time(lambda: read_all_frames(path, 64), 1)
        one_minute = clips_s if seconds == 60 else one_minute
        ratio = f"{clips_s / one_minute:.2f}x" if one_minute else ""
        table.add_row(label, f"{clips_s:.3f}", f"{whole_s:.3f}", f"{whole_s / clips_s:.1f}x", ratio)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="small3d,r3d_18,mc3_18,r2plus1d_18",
                        help=f"comma-separated, or 'all' ({', '.join(BACKBONES)})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    names = list(BACKBONES) if args.backbones == "all" else args.backbones.split(",")
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        sys.exit(f"error: unknown backbone(s) {', '.join(unknown)} (--backbones)")
    CACHE.mkdir(parents=True, exist_ok=True)
    console = Console()
    console.print(bench_long_videos(args.repeats))
    console.print(bench_backbones(names, select_device(args.device), args.clips, args.repeats))


if __name__ == "__main__":
    main()
