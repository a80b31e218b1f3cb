"""LLaVA-NeXT-Video inputs without torchvision: frame pixels and the prompt's video placeholder tokens.

:class:`FramePreprocessor` applies the steps of ``transformers``' ``LlavaNextVideoVideoProcessor`` (a
``BaseVideoProcessor``: resize the shortest edge, bicubic with antialiasing; center crop; rescale and
normalise fused as ``(x - mean / factor) / (std / factor)``) with plain torch ops, reading the model's own
``video_preprocessor_config.json``. The HF class needs torchvision, which does not import beside the CPU build of
torch 2.13 that tokenmem's CI uses; ``tests/test_video_processor.py`` checks both give identical tensors and
token ids wherever torchvision imports.

:func:`video_token_count` is the count ``LlavaNextVideoProcessor.replace_video_token`` gives:
``(H // patch) * (W // patch) // 4`` tokens per frame (the 2x2 average pool of the video resampler).
"""

from __future__ import annotations

import json
import os
import platform

import numpy as np
import torch
import torch.nn.functional as F

from tokenmem.errors import TokenmemError

CONFIG_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the defaults of LlavaNextVideoVideoProcessor (transformers 5.x) for keys a config file leaves out
DEFAULTS = dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
_MODES = {2: "bilinear", 3: "bicubic"}  # PIL resample codes -> interpolate modes


class FramePreprocessor:
    """uint8 RGB frames ``[T, H, W, 3]`` -> ``pixel_values_videos`` rows ``[T, 3, crop_h, crop_w]`` (float32)."""

    def __init__(self, **config):
        unknown_size = set(config.get("size") or {}) - {"shortest_edge", "height", "width"}
        if unknown_size:
            raise TokenmemError(f"video preprocessor size keys {sorted(unknown_size)} are not supported; "
                                "use 'shortest_edge' or 'height'/'width'")
        self.config = {k: config.get(k, v) for k, v in DEFAULTS.items()}
        if self.config["resample"] not in _MODES:
            raise TokenmemError(f"video preprocessor resample={self.config['resample']!r} is not supported; "
                                "use 3 (bicubic, as LLaVA-NeXT-Video) or 2 (bilinear)")

    @classmethod
    def from_pretrained(cls, path: str) -> "FramePreprocessor":
        return cls(**read_processor_config(path))

    @property
    def crop(self) -> tuple[int, int]:
        c = self.config
        if c["do_center_crop"]:
            return c["crop_size"]["height"], c["crop_size"]["width"]
        size = c["size"]
        if "height" in size:
            return size["height"], size["width"]
        raise TokenmemError("without center crop the frame size depends on the video; set do_center_crop")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after the resize (``get_resize_output_image_size`` with ``default_to_square=False``)."""
        size = self.config["size"]
        if "height" in size:
            return size["height"], size["width"]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, frames) -> torch.Tensor:
        c = self.config
        video = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        if video.dim() != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
            raise TokenmemError(f"frames must be uint8 RGB [frames, height, width, 3], got {tuple(video.shape)} "
                                f"{video.dtype}")
        video = video.permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W]
        if c["do_resize"]:
            video = self._resize(video, self.output_size(*video.shape[-2:]))
        if c["do_center_crop"]:
            video = _center_crop(video, c["crop_size"]["height"], c["crop_size"]["width"])
        return rescale_and_normalize(video, c)

    def _resize(self, video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize_frames(video, size, self.config["resample"])


def read_processor_config(path: str) -> dict:
    """The video preprocessor config a model directory holds (``video_preprocessor_config.json``, else
    ``preprocessor_config.json``)."""
    for name in CONFIG_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                try:
                    return json.load(f)
                except json.JSONDecodeError as e:
                    raise TokenmemError(f"{file} is not valid JSON ({e}); restore the model's processor files "
                                        "(processor.save_pretrained(path))") from None
    raise TokenmemError(f"no {' or '.join(CONFIG_FILES)} in {path!r}: save the model's processor there "
                        "(processor.save_pretrained(path)) so frames are prepared as the model was trained")


def rescale_and_normalize(video: torch.Tensor, c: dict) -> torch.Tensor:
    """uint8 frames ``[T, 3, H, W]`` -> float32, rescaled and normalised with the config's ``do_rescale``,
    ``rescale_factor``, ``do_normalize``, ``image_mean``, ``image_std`` (fused as
    ``BaseVideoProcessor.rescale_and_normalize``: ``(x - mean / factor) / (std / factor)``)."""
    factor = c["rescale_factor"]
    if c["do_normalize"]:
        mean = torch.tensor(c["image_mean"], device=video.device)
        std = torch.tensor(c["image_std"], device=video.device)
        if c["do_rescale"]:
            mean, std = mean * (1.0 / factor), std * (1.0 / factor)
        return video.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    return video.to(torch.float32) * factor if c["do_rescale"] else video.to(torch.float32)


def resize_frames(video: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """torchvision's ``resize_image`` on uint8 frames ``[..., H, W]`` (``resample``: PIL code, 3 bicubic or 2
    bilinear, with antialiasing): uint8 is interpolated natively on CPU (bicubic, and bilinear with
    AVX2/AVX512/arm), otherwise in float32 then clamped and rounded back to uint8."""
    if tuple(video.shape[-2:]) == tuple(size):
        return video
    if resample not in _MODES:
        raise TokenmemError(f"video preprocessor resample={resample!r} is not supported; use 3 (bicubic) or 2 "
                            "(bilinear)")
    mode = _MODES[resample]
    native = video.device.type == "cpu" and (
        mode == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        or platform.machine() in ("aarch64", "arm64"))
    if native:
        return F.interpolate(video, size=list(size), mode=mode, align_corners=False, antialias=True)
    out = F.interpolate(video.to(torch.float32), size=list(size), mode=mode, align_corners=False, antialias=True)
    if mode == "bicubic":
        out = out.clamp_(0, 255)
    return out.round_().to(torch.uint8)


def _center_crop(video: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """``TorchvisionBackend.center_crop``: zero-pad a frame smaller than the crop, then crop the middle."""
    h, w = video.shape[-2:]
    if crop_w > w or crop_h > h:
        pad = [(crop_w - w) // 2 if crop_w > w else 0, (crop_w - w + 1) // 2 if crop_w > w else 0,
               (crop_h - h) // 2 if crop_h > h else 0, (crop_h - h + 1) // 2 if crop_h > h else 0]
        video = F.pad(video, pad, value=0)
        h, w = video.shape[-2:]
        if (h, w) == (crop_h, crop_w):
            return video
    top, left = int((h - crop_h) / 2.0), int((w - crop_w) / 2.0)
    return video[..., top : top + crop_h, left : left + crop_w]


def video_token_count(config, frame_size: tuple[int, int]) -> int:
    """Tokens per frame, as ``LlavaNextVideoProcessor.replace_video_token`` counts them, checked against
    what the model's vision tower and resampler produce (they disagree unless the pool stride is 2 with
    the ``"default"`` feature strategy, because the processor hard-codes the ``// 4``)."""
    patch = config.vision_config.patch_size
    height, width = frame_size
    counted = (height // patch) * (width // patch) // 4
    stride = config.spatial_pool_stride
    produced = ((height // patch) // stride) * ((width // patch) // stride)
    if config.vision_feature_select_strategy != "default" or counted != produced:
        raise TokenmemError(
            f"this LLaVA-NeXT-Video config gives {produced} tokens per {height}x{width} frame (patch {patch}, pool "
            f"stride {stride}, strategy {config.vision_feature_select_strategy!r}) but LlavaNextVideoProcessor "
            f"counts {counted}; use spatial_pool_stride=2, vision_feature_select_strategy='default' and a frame "
            "size that is an even number of patches"
        )
    return counted
