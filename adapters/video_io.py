"""Reading a video as N uint8 RGB frames with their timestamps: decord first, PyAV as the fallback (and writing
frames to a file with PyAV, :func:`write_video`).

Frames are sampled the way ``transformers``' ``default_sample_indices_fn`` does (``video_utils.py``): N frames
uniformly (``index_i = i * total // N``), or a fixed rate (``N = max(1, int(total / video_fps * fps))``).

decord 0.6.0 is unmaintained and has known problems that the reading pattern here works around:

- memory growth when frames are sought and the reader lives on (dmlc/decord #157, #197, #208): every call
  opens its own ``VideoReader`` with one decoding thread, asks for all sampled frames in one ``get_batch``
  with sorted indices, seeks back to frame 0 (the workaround reported in #197 / #208) and drops the reader;
  reading hundreds of videos in one process keeps its RSS flat (``tests/test_video_io.py``);
- hangs inside ``get_batch`` (#269; #373: a container that over-reports its frame count) happen in native
  code and cannot be interrupted from Python: ``reader="pyav"`` reads with PyAV instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from tokenmem.errors import TokenmemError

READERS = ("auto", "decord", "pyav")
INSTALL_HINT = "pip install 'tokenmem[video]'"


class VideoError(TokenmemError, ValueError):
    """A video that cannot be read as asked (missing, undecodable, too short), or no reader installed."""


@dataclass
class Clip:
    """Frames sampled from a video."""

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    timestamps: np.ndarray  # [T] float64 seconds (presentation time of each frame)
    indices: np.ndarray  # [T] int64 frame index in the file
    fps: float  # the file's average frame rate
    total_frames: int  # frames in the file
    path: str = ""
    reader: str = ""

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def sample_indices(total: int, num_frames: int | None = None, fps: float | None = None,
                   video_fps: float | None = None, path: str = "") -> np.ndarray:
    """Frame indices to read: ``num_frames`` uniformly, or ``fps`` frames per second (not both)."""
    where = f"the video {path!r}" if path else "the video"
    if (num_frames is None) == (fps is None):
        raise VideoError("give exactly one of num_frames (frames sampled uniformly) or fps (frames per second)")
    if fps is not None:
        if not fps > 0:
            raise VideoError(f"fps must be > 0, got {fps!r}")
        if not video_fps or video_fps <= 0:
            raise VideoError(f"{where} reports no frame rate, so it cannot be sampled at fps={fps}; use num_frames")
        num_frames = max(1, int(total / video_fps * fps))
        if num_frames > total:
            raise VideoError(f"{where} has {total} frames at {video_fps:g} fps: sampling at fps={fps:g} asks for "
                             f"{num_frames} frames; use fps <= {video_fps:g}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise VideoError(f"the number of frames must be a positive int, got {num_frames!r}")
    if num_frames > total:
        raise VideoError(f"{where} has only {total} frames, so {num_frames} distinct frames cannot be sampled; "
                         f"use at most {total} frames")
    return np.arange(num_frames, dtype=np.int64) * total // num_frames


def read_video(path, num_frames: int | None = 32, *, fps: float | None = None, reader: str = "auto") -> Clip:
    """Read ``num_frames`` frames sampled uniformly (or ``fps`` frames per second) from the video at ``path``.

    ``reader``: ``"decord"``, ``"pyav"`` or ``"auto"`` (decord when installed, else PyAV; a file decord cannot
    decode is retried with PyAV). Raises :class:`VideoError` naming the problem and the fix.
    """
    path = os.fspath(path)
    if reader not in READERS:
        raise VideoError(f"reader must be one of {READERS}, got {reader!r}")
    if fps is not None:
        num_frames = None
    if os.path.isdir(path):
        raise VideoError(f"{path!r} is a directory, not a video file; give the path of a video file (mp4, mkv, avi, ...)")
    if not os.path.isfile(path):
        raise VideoError(f"video file {path!r} does not exist; give the path of a video file (mp4, mkv, avi, ...)")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise VideoError(f"video file {path!r} cannot be read ({exc}); check its permissions") from exc
    if reader == "auto":
        order = [r for r in ("decord", "pyav") if _available(r)]
        if not order:
            raise VideoError(f"reading videos needs decord (or PyAV as the fallback), and neither is installed: "
                             f"{INSTALL_HINT}")
    else:
        if not _available(reader):
            package = "decord" if reader == "decord" else "av (PyAV)"
            raise VideoError(f"reader={reader!r} needs the {package} package, which is not installed: {INSTALL_HINT}")
        order = [reader]
    problems = []
    for name in order:
        try:
            return (_read_decord if name == "decord" else _read_pyav)(path, num_frames, fps)
        except _Undecodable as exc:
            problems.append(f"{name}: {exc}")
    raise VideoError(f"could not decode {path!r} as a video ({'; '.join(problems)}); check that it is a video "
                     "file (e.g. `ffprobe FILE`), or re-encode it (e.g. `ffmpeg -i FILE -c:v libx264 out.mp4`)")


class _Undecodable(Exception):
    pass


def _available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec("decord" if name == "decord" else "av") is not None


def _read_decord(path: str, num_frames, fps) -> Clip:
    import decord

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord raises DECORDError (a RuntimeError) for files it cannot open
        raise _Undecodable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
    try:
        total, video_fps = len(vr), float(vr.get_avg_fps())
        if total == 0:
            raise _Undecodable("no video frames")
        indices = sample_indices(total, num_frames, fps, video_fps, path)
        try:
            frames = vr.get_batch(indices.tolist()).asnumpy()
            timestamps = vr.get_frame_timestamp(indices.tolist())[:, 0].astype(np.float64)
            vr.seek(0)  # releases the decoder's buffered frames (dmlc/decord #197, #208)
        except decord.DECORDError as exc:
            raise _Undecodable(str(exc).strip().splitlines()[0]) from None
    finally:
        del vr
    return Clip(frames=np.ascontiguousarray(frames), timestamps=timestamps, indices=indices, fps=video_fps,
                total_frames=total, path=path, reader="decord")


def _read_pyav(path: str, num_frames, fps) -> Clip:
    """Decode every frame in order (no seeking: exact indices on any container), keeping the sampled ones."""
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, ValueError) as exc:
        raise _Undecodable(str(exc)) from None
    with container:
        if not container.streams.video:
            raise _Undecodable("no video stream")
        stream = container.streams.video[0]
        video_fps = float(stream.average_rate) if stream.average_rate else 0.0
        total = stream.frames
        try:
            if not total:  # the container does not say: count by decoding
                total = sum(1 for _ in container.decode(stream))
                container.seek(0)
            if total == 0:
                raise _Undecodable("no video frames")
            indices = sample_indices(total, num_frames, fps, video_fps, path)
            wanted = {int(i): k for k, i in enumerate(indices)}
            frames, timestamps = [None] * len(indices), np.zeros(len(indices))
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    k = wanted[i]
                    frames[k] = frame.to_ndarray(format="rgb24")
                    timestamps[k] = float(frame.time) if frame.time is not None else i / (video_fps or 1.0)
                if i >= indices[-1]:
                    break
        except av.error.FFmpegError as exc:
            raise _Undecodable(str(exc)) from None
    missing = [int(indices[k]) for k, f in enumerate(frames) if f is None]
    if missing:
        raise _Undecodable(f"the container reports {total} frames but frame {missing[0]} could not be decoded")
    return Clip(frames=np.stack(frames), timestamps=timestamps, indices=indices, fps=video_fps, total_frames=total,
                path=path, reader="pyav")


def write_video(path, frames: np.ndarray, fps: int = 8, codec: str = "libx264", crf: int = 0) -> str:
    """Encode ``[T, H, W, 3]`` uint8 RGB frames (even H and W) to ``path`` with PyAV (H.264, yuv420p)."""
    try:
        import av
    except ImportError:
        raise TokenmemError("writing videos needs PyAV: pip install 'tokenmem[video]'") from None
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise TokenmemError(f"frames must be [T, H, W, 3] uint8 with even H and W, got {frames.shape}")
    if frames.shape[0] == 0:
        raise TokenmemError(f"cannot write a video without frames (got {frames.shape}) to {os.fspath(path)!r}")
    path = os.fspath(path)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)} if codec.startswith("libx264") else {}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
