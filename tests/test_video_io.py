"""Video reading: decord reads the mp4 files written here (known colours, frame counts, sampling), PyAV reads
the same frames, bad input raises a VideoError that says what to do, and many reads keep RSS flat."""

import sys

import numpy as np
import pytest

from tokenmem.adapters import video_io
from tokenmem.adapters.video_io import VideoError, read_video, sample_indices, write_video
from video_fixtures import moving_shapes, solid_frames

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (255, 255, 0),
           (0, 255, 255), (128, 64, 200), (30, 200, 90), (200, 120, 20), (90, 90, 90), (250, 10, 160)]


@pytest.fixture(scope="module")
def colour_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("colours") / "colours.mp4"
    return str(write_video(path, solid_frames(COLOURS), fps=6))


@pytest.mark.parametrize("reader", ["decord", "pyav"])
def test_reader_returns_the_frames_of_known_colours(colour_video, reader):
    clip = read_video(colour_video, len(COLOURS), reader=reader)
    assert clip.reader == reader and clip.total_frames == len(COLOURS)
    assert clip.frames.shape == (len(COLOURS), 32, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.indices.tolist() == list(range(len(COLOURS)))
    assert clip.fps == pytest.approx(6.0)
    np.testing.assert_allclose(clip.timestamps, np.arange(len(COLOURS)) / 6.0, atol=1e-3)
    for frame, colour in zip(clip.frames, COLOURS):  # H.264 in yuv420p: colours come back within a few levels
        assert np.abs(frame.reshape(-1, 3).astype(int) - colour).max() <= 6, colour


def test_sampling_uniform_and_fps(colour_video):
    every = read_video(colour_video, len(COLOURS), reader="decord")
    four = read_video(colour_video, 4, reader="decord")
    assert four.indices.tolist() == [0, 3, 6, 9]  # i * total // n, as transformers' default sampler
    assert np.array_equal(four.frames, every.frames[four.indices])
    at_2fps = read_video(colour_video, fps=2.0, reader="decord")  # 12 frames at 6 fps = 2 s -> 4 frames
    assert at_2fps.indices.tolist() == [0, 3, 6, 9]
    assert sample_indices(10, 3).tolist() == [0, 3, 6]


def test_decord_and_pyav_read_the_same_frames(tmp_path):
    path = write_video(tmp_path / "shapes.mp4", moving_shapes(30, 48, 64))
    a = read_video(path, 10, reader="decord")
    b = read_video(path, 10, reader="pyav")
    assert a.indices.tolist() == b.indices.tolist()
    np.testing.assert_allclose(a.timestamps, b.timestamps, atol=1e-3)
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        read_video(tmp_path / "nope.mp4", 8)


@pytest.mark.parametrize("reader", ["auto", "decord", "pyav"])
def test_undecodable_file(tmp_path, reader):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="could not decode .*re-encode it"):
        read_video(bad, 4, reader=reader)


@pytest.mark.parametrize("reader", ["decord", "pyav"])
def test_too_many_frames_names_the_maximum(colour_video, reader):
    with pytest.raises(VideoError, match=r"has only 12 frames.*use at most 12 frames"):
        read_video(colour_video, 13, reader=reader)
    with pytest.raises(VideoError, match=r"use fps <= 6"):
        read_video(colour_video, fps=12.0, reader=reader)


def test_missing_decord_names_the_video_extra(colour_video, monkeypatch):
    monkeypatch.setattr(video_io, "_available", lambda name: name != "decord")
    with pytest.raises(VideoError, match=r"needs the decord package.*tokenmem\[video\]"):
        read_video(colour_video, 4, reader="decord")
    assert read_video(colour_video, 4).reader == "pyav"  # auto falls back to PyAV
    monkeypatch.setattr(video_io, "_available", lambda name: False)
    with pytest.raises(VideoError, match=r"tokenmem\[video\]"):
        read_video(colour_video, 4)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_reading_200_videos_keeps_rss_flat(tmp_path):
    """dmlc/decord #157/#197/#208: the reading pattern must not accumulate decoded frames across calls."""
    path = write_video(tmp_path / "big.mp4", moving_shapes(12, 128, 160))
    for i in range(200):
        read_video(path, 8, reader="decord")
        if i == 19:
            start = rss_mib()
    end = rss_mib()
    assert end - start < 16, f"RSS grew from {start:.1f} to {end:.1f} MiB over 180 reads"
