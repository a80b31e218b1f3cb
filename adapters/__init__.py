"""tokenmem.adapters: modality -> model inputs + TokenMeta, on one base (:mod:`.base`: prompts, chunked prefill,
generation, metadata)."""

from .base import Adapter, Prompt
from .text import TextAdapter, load_causal_lm, prefill, separator_ids
from .video import VideoQA, load_llava_next_video
from .video_io import Clip, VideoError, read_video

__all__ = ["Adapter", "Prompt", "TextAdapter", "load_causal_lm", "prefill", "separator_ids",
           "Clip", "VideoError", "VideoQA", "load_llava_next_video", "read_video"]
