"""Qwen2-VL video inputs without torchvision: flattened patches, the patch grid and the video token count.

:class:`Qwen2VLFramePreprocessor` applies the steps of ``transformers``' ``Qwen2VLVideoProcessor`` with plain torch
ops, reading the model's own ``video_preprocessor_config.json`` (Wang et al. 2024, "Qwen2-VL: Enhancing
Vision-Language Model's Perception of the World at Any Resolution", https://github.com/QwenLM/Qwen2-VL):

1. resize every frame to the ``smart_resize`` grid: both sides multiples of ``patch_size * merge_size`` (28 px),
   the pixel count within ``[shortest_edge, longest_edge]`` (the ``min_pixels`` / ``max_pixels`` of older
   configs), the aspect ratio kept; bicubic with antialiasing as torchvision on uint8;
2. rescale and normalise (fused, OpenAI CLIP mean and std by default);
3. pad the frame count to a multiple of ``temporal_patch_size`` (2) by repeating the last frame, then cut
   ``temporal_patch_size x patch_size x patch_size`` patches (14 px), ordered so that each ``merge_size x
   merge_size`` (2 x 2) block of neighbouring patches is contiguous: the vision tower's patch merger turns every
   block into one language-model token.

A clip of ``T`` frames of ``H x W`` pixels (after the resize) thus gives ``ceil(T / 2)`` temporal patches of
``(H / 28) * (W / 28)`` tokens each. ``tests/test_video_processor.py`` checks the patches, the grid and the token
count equal transformers' own processor wherever torchvision imports (CI's vision environment).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tokenmem.errors import TokenmemError

from .video_frames import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, read_processor_config, rescale_and_normalize,
                           resize_frames)

# the defaults of Qwen2VLVideoProcessor (transformers 5.x) for keys a config file leaves out
DEFAULTS = dict(do_resize=True, size={"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, resample=3,
                do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP_MEAN,
                image_std=OPENAI_CLIP_STD, patch_size=14, temporal_patch_size=2, merge_size=2,
                cap_pixels_per_frame=False, max_video_tokens=128000)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The frame size Qwen2-VL's processors resize to: sides multiples of ``factor``, pixels within
    ``[min_pixels, max_pixels]``, the aspect ratio kept as closely as the grid allows."""
    if max(height, width) / min(height, width) > 200:
        raise TokenmemError(f"a {height}x{width} frame has an aspect ratio above 200, which Qwen2-VL cannot "
                            "patch; crop the video first")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen2VLFramePreprocessor:
    """uint8 RGB frames ``[T, H, W, 3]`` -> ``(pixel_values_videos [t * h * w, 3 * 2 * 14 * 14], grid (t, h, w))``,
    the grid counted in patches (``t`` temporal patches; ``h * w / merge_size**2`` tokens per temporal patch)."""

    def __init__(self, **config):
        config = dict(config)
        size = dict(config.pop("size", None) or DEFAULTS["size"])
        if config.get("min_pixels") is not None:  # older configs
            size["shortest_edge"] = config.pop("min_pixels")
        if config.get("max_pixels") is not None:
            size["longest_edge"] = config.pop("max_pixels")
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise TokenmemError(f"a Qwen2-VL video preprocessor size needs 'shortest_edge' and 'longest_edge' (the "
                                f"minimum and maximum pixels of a frame), got {size}")
        self.config = {k: config.get(k, v) for k, v in DEFAULTS.items()}
        self.config["size"] = size
        if self.config["cap_pixels_per_frame"] is None:
            self.config["cap_pixels_per_frame"] = False  # transformers' default (with a warning) in 5.x
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            value = self.config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TokenmemError(f"Qwen2-VL video preprocessor {key} must be a positive int, got {value!r}")

    @classmethod
    def from_pretrained(cls, path: str) -> "Qwen2VLFramePreprocessor":
        return cls(**read_processor_config(path))

    @property
    def factor(self) -> int:
        return self.config["patch_size"] * self.config["merge_size"]

    def output_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """Frame size after the resize of a ``frames``-frame clip of ``height x width`` frames."""
        c = self.config
        if not c["do_resize"]:
            return height, width
        max_pixels = c["size"]["longest_edge"]
        if c["cap_pixels_per_frame"]:  # the total-video pixel budget of qwen-vl-utils
            total = int(c["max_video_tokens"] * self.factor * self.factor * 0.9)
            max_pixels = max(min(max_pixels, total * c["temporal_patch_size"] // frames),
                             int(c["size"]["shortest_edge"] * 1.05))
        return smart_resize(height, width, self.factor, c["size"]["shortest_edge"], max_pixels)

    def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """``(t, h, w)`` in patches of a ``frames``-frame clip of ``height x width`` frames."""
        p, tp = self.config["patch_size"], self.config["temporal_patch_size"]
        h, w = self.output_size(frames, height, width)
        if h % self.factor or w % self.factor:
            raise TokenmemError(f"frames of {h}x{w} px are not a whole number of {self.factor}-px merged patches; "
                                "set do_resize (or resize the video to multiples of patch_size * merge_size)")
        return -(-frames // tp), h // p, w // p

    def tokens(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """``(temporal patches, language-model tokens per temporal patch)`` of such a clip."""
        t, h, w = self.grid(frames, height, width)
        return t, h * w // self.config["merge_size"] ** 2

    def __call__(self, frames) -> tuple[torch.Tensor, tuple[int, int, int]]:
        c = self.config
        video = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        if video.dim() != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
            raise TokenmemError(f"frames must be uint8 RGB [frames, height, width, 3], got {tuple(video.shape)} "
                                f"{video.dtype}")
        if video.shape[0] == 0:
            raise TokenmemError("the video has no frames; give at least one frame")
        grid_t, grid_h, grid_w = self.grid(*video.shape[:3])
        video = video.permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W]
        if c["do_resize"]:
            video = resize_frames(video, (grid_h * c["patch_size"], grid_w * c["patch_size"]), c["resample"])
        video = rescale_and_normalize(video, c)
        return patchify(video, c["patch_size"], c["merge_size"], c["temporal_patch_size"]), (grid_t, grid_h, grid_w)


def patchify(video: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """Frames ``[T, C, H, W]`` -> rows ``[t * h * w, C * temporal * patch * patch]`` in the order Qwen2-VL's vision
    tower reads them: temporal patch, then merge blocks row-major, then the patches of a block row-major; each row
    holds channel, time, patch row, patch column (the last frame repeated to fill the last temporal patch)."""
    frames, channels, height, width = video.shape
    if pad := -frames % temporal:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        frames += pad
    t, h, w = frames // temporal, height // patch, width // patch
    x = video.view(t, temporal, channels, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, block row, block col, row in block, col in block, C, time, py, px
    return x.reshape(t * h * w, channels * temporal * patch * patch)
