"""Encoding generated frames into the video formats a client asks for: animated WebP and GIF
(Pillow, looping forever) and MP4 (H.264 through PyAV's FFmpeg).

- WebP is lossless, so every frame keeps every pixel.
- GIF has a 256-color palette per frame and durations in hundredths of a second: 8 fps plays
  at 120 or 130 ms a frame, not 125.
- MP4 is H.264 in yuv420p, whose chroma is subsampled 2x2, so the width and height must be
  even: an odd side is padded by repeating its last row / column (the MP4 is then one pixel
  larger there). The `moov` index goes first (`faststart`) so a browser starts playing before
  the whole file has arrived; FFmpeg writes that in a second pass over a file, hence the
  temporary file rather than memory.
"""

from __future__ import annotations

import io
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

VIDEO_FORMATS = {"webp": "image/webp", "gif": "image/gif", "mp4": "video/mp4"}
MP4_CRF = 18  # x264 quality (0 lossless .. 51): visually lossless on flat synthetic frames


def encode_video(frames: np.ndarray, output_format: str, fps: float) -> tuple[bytes, str]:
    """uint8 [F, H, W, 3] -> (file bytes, mime type)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got {frames.dtype} {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if output_format == "mp4":
        return _mp4(frames, fps), VIDEO_FORMATS["mp4"]
    if output_format not in VIDEO_FORMATS:
        raise ValueError(f"unknown video format {output_format!r}; one of {sorted(VIDEO_FORMATS)}")
    return _animated(frames, output_format, fps), VIDEO_FORMATS[output_format]


def _animated(frames: np.ndarray, output_format: str, fps: float) -> bytes:
    images = [Image.fromarray(f) for f in frames]
    options = {"lossless": True} if output_format == "webp" else {"optimize": False}
    buf = io.BytesIO()
    images[0].save(buf, format=output_format.upper(), save_all=True, append_images=images[1:],
                   duration=round(1000 / fps), loop=0, **options)
    return buf.getvalue()


def even(frames: np.ndarray) -> np.ndarray:
    """Pad an odd height or width by repeating the last row / column (yuv420p needs even sides)."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _mp4(frames: np.ndarray, fps: float) -> bytes:
    frames = even(frames)
    rate = Fraction(fps).limit_denominator(1001)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.options = {"crf": str(MP4_CRF)}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed frames
        return path.read_bytes()
