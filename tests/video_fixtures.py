"""Test fixtures for video QA: a tiny random LLaVA-NeXT-Video saved like a real checkpoint, and synthetic
videos (the tests, ``examples/video_qa.py`` and ``benchmarks/video.py`` use both; nothing is downloaded; write
them to files with :func:`tokenmem.adapters.video_io.write_video`).

The tiny model follows the working configuration noted in the LLaVA-NeXT-Video issue: a CLIP vision tower
(16 px frames, patch 2, hidden 32, 2 layers) and a Llama text model (hidden 32, 2 layers, 4 heads, 2 KV heads),
with the pool stride 2 and the ``"default"`` feature strategy that ``LlavaNextVideoProcessor``'s token count
assumes: 16 tokens per frame. Its tokenizer is a byte-level BPE trained here (``tokenmem.zoo.tokenizer.train_byte_bpe``)
plus the ``<image>`` / ``<video>`` special tokens; its processor files are the ones
``LlavaNextVideoProcessor.from_pretrained`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tokenmem.adapters.video import CHAT_TEMPLATE
from tokenmem.adapters.video_frames import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tokenmem.adapters.video_io import write_video  # noqa: F401  (the fixtures' users write videos with it)
_TEXT = [
    "USER: What colour is the square? ASSISTANT: The square is red.",
    "USER: Which way does the ball move? ASSISTANT: The ball moves down, then it stops.",
    "USER: How many shapes are there? ASSISTANT: There are two shapes: a square and a ball.",
    "USER: Describe the video. ASSISTANT: A red square slides to the right over a grey floor.",
] * 8


def build_tiny_llava_next_video(path, *, seed: int = 0, frame_size: int = 16, patch: int = 2, hidden: int = 32,
                                layers: int = 2, heads: int = 4, kv_heads: int = 2, vision_layers: int = 2,
                                vocab: int = 320) -> str:
    """Create a random LLaVA-NeXT-Video + tokenizer + processor files at ``path`` (``save_pretrained`` layout)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig,
                              LlavaNextVideoForConditionalGeneration)

    from tokenmem.zoo.tokenizer import train_byte_bpe

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_byte_bpe(_TEXT, vocab_size=vocab - 2)
    tokenizer.add_tokens(["<image>", "<video>"], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    vision = CLIPVisionConfig(image_size=frame_size, patch_size=patch, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=heads, projection_dim=hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=16384, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokens_per_side = frame_size // patch
    config = LlavaNextVideoConfig(
        vision_config=vision, text_config=text, image_token_index=image_id, video_token_index=video_id,
        image_grid_pinpoints=[[frame_size, 2 * frame_size], [2 * frame_size, frame_size]],
        image_seq_length=tokens_per_side**2, video_seq_length=tokens_per_side**2 // 4,
        spatial_pool_stride=2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    frames = dict(size={"shortest_edge": frame_size}, crop_size={"height": frame_size, "width": frame_size},
                  do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                  image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), resample=3, do_convert_rgb=True)
    _write_json(path / "video_preprocessor_config.json", {**frames, "video_processor_type": "LlavaNextVideoVideoProcessor",
                                                          "processor_class": "LlavaNextVideoProcessor"})
    _write_json(path / "preprocessor_config.json", {**frames, "image_processor_type": "LlavaNextImageProcessor",
                                                    "image_grid_pinpoints": config.image_grid_pinpoints,
                                                    "processor_class": "LlavaNextVideoProcessor"})
    _write_json(path / "processor_config.json", {"processor_class": "LlavaNextVideoProcessor", "patch_size": patch,
                                                 "vision_feature_select_strategy": "default",
                                                 "num_additional_image_tokens": 1, "video_token": "<video>",
                                                 "image_token": "<image>"})
    return str(path)


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# -- synthetic videos ----------------------------------------------------------------------------------
def moving_shapes(num_frames: int = 48, height: int = 48, width: int = 64, still: tuple[int, int] | None = None,
                  seed: int = 0) -> np.ndarray:
    """``[T, H, W, 3]`` uint8: a red square sliding right and a blue disc moving down over a grey floor with a
    little seeded texture. Frames ``still[0]..still[1]-1`` (default: the middle third) repeat one frame exactly."""
    rng = np.random.default_rng(seed)
    floor = (96 + rng.integers(-12, 12, size=(height, width, 1))).clip(0, 255).astype(np.uint8).repeat(3, axis=2)
    still = (num_frames // 3, 2 * num_frames // 3) if still is None else still
    yy, xx = np.mgrid[:height, :width]
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    side, radius = max(2, height // 5), max(2, height // 8)

    def motion(t):  # frames still[0]..still[1]-1 share one motion step
        return t if t < still[0] else still[0] if t < still[1] else still[0] + t - still[1] + 1

    steps = max(1, motion(num_frames - 1))
    for t in range(num_frames):
        frame = floor.copy()
        x0 = motion(t) * (width - side) // steps
        frame[height // 4 : height // 4 + side, x0 : x0 + side] = (220, 30, 30)
        cy = radius + motion(t) * (height - 2 * radius) // steps
        frame[(yy - cy) ** 2 + (xx - width * 3 // 4) ** 2 <= radius**2] = (30, 60, 220)
        out[t] = frame
    return out


def solid_frames(colours, height: int = 32, width: int = 32) -> np.ndarray:
    """``[len(colours), H, W, 3]`` uint8 frames, each filled with one RGB colour."""
    colours = np.asarray(colours, dtype=np.uint8).reshape(-1, 1, 1, 3)
    return np.broadcast_to(colours, (colours.shape[0], height, width, 3)).copy()
