"""Fixtures for the video tests: a tiny LLaVA-NeXT-Video saved with save_pretrained, videos written at test time."""

from __future__ import annotations

import pytest

from tokenmem.adapters.video_io import write_video
from video_fixtures import build_tiny_llava_next_video, moving_shapes


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    return build_tiny_llava_next_video(tmp_path_factory.mktemp("llava-next-video"))


@pytest.fixture(scope="session")
def shape_videos(tmp_path_factory):
    """Two mp4 files of moving shapes (48 frames; frames 16..31 identical), different sizes and seeds."""
    folder = tmp_path_factory.mktemp("videos")
    return [write_video(folder / "a.mp4", moving_shapes(48, 48, 64, seed=0)),
            write_video(folder / "b.mp4", moving_shapes(48, 40, 40, seed=1))]
