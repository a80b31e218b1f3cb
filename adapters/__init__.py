"""tokenmem.adapters: modality -> model inputs + TokenMeta."""

from .text import TextAdapter, load_causal_lm, prefill, separator_ids
from .video import VideoQA, load_llava_next_video
from .video_io import Clip, VideoError, read_video

__all__ = ["TextAdapter", "load_causal_lm", "prefill", "separator_ids",
           "Clip", "VideoError", "VideoQA", "load_llava_next_video", "read_video"]
