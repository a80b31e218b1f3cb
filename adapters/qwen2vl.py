"""Qwen2-VL video question answering under the same bounded, frame-aware TokenMemory as LLaVA-NeXT-Video.

:class:`Qwen2VLVideoQA` has :class:`~tokenmem.adapters.video.VideoQA`'s public API (``ask``, ``ask_many``, chunked
prefill, protected question, per-frame kept-token report; ``tokenmem video-qa`` picks it by the model's type) for
``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration`` (Wang et al. 2024, "Qwen2-VL";
Bai et al. 2025, "Qwen2.5-VL Technical Report"; https://github.com/QwenLM/Qwen2.5-VL):

- frames -> patches: :class:`~tokenmem.adapters.qwen2vl_frames.Qwen2VLFramePreprocessor` (the steps of
  ``Qwen2VLVideoProcessor`` in plain torch, proven equal to it where torchvision imports);
- model: the real ``from_pretrained`` on a local path; only the language model is switched to the ``"tokenmem"``
  attention, the vision tower keeps its own;
- positions: multimodal RoPE ``[3, b, q]`` (temporal, height, width) from the model's own ``get_rope_index``,
  and ``rope_deltas`` recorded on the model so that the tokens generated after a chunked prefill continue as
  transformers' whole-prompt ``generate`` continues them: one position after the prompt's last token.
  ``positions="shift"`` is refused with a :class:`~tokenmem.TokenmemError` (the memory does not re-rotate per
  M-RoPE section); ``"original"`` is the default;
- metadata: a video token gets modality ``"frame"`` and **segment = its temporal patch** ``t``, which covers video
  frames ``2t`` and ``2t + 1`` (the vision tower's 3-D patches span two frames, so no token belongs to one frame);
  the ``token`` field is its index inside the patch (row-major over the merged grid). ``evict_unit="frame"`` keeps
  or drops whole temporal patches. The report's columns are temporal patches
  (:attr:`FrameReport.frames_per_column` = 2; :meth:`FrameReport.columns_of` maps video frames to columns).

>>> qa = Qwen2VLVideoQA("path/to/qwen2-vl", evictor="h2o", budget=0.25, prefill_chunk=32)
>>> print(qa.ask("clip.mp4", "What is moving?").text)
"""

from __future__ import annotations

import json
import os

import torch

from tokenmem.errors import InputError, TokenmemError
from tokenmem.files import load_pretrained

from .base import Prompt
from .qwen2vl_frames import Qwen2VLFramePreprocessor
from .video import QWEN2VL_MODEL_TYPES as MODEL_TYPES
from .video import VideoInputs, VideoQA, model_type
from .video_io import Clip

FALLBACK_PROMPT = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>\n"
                   "<|im_start|>assistant\n")


def load_qwen2_vl(path: str, *, dtype: torch.dtype | str = torch.float32, **kwargs):
    """``(model, tokenizer, preprocessor, chat_template)`` from a local Qwen2-VL or Qwen2.5-VL directory."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    if not os.path.isdir(path):
        raise TokenmemError(f"model path {path!r} is not a local directory; tokenmem loads models with "
                            "from_pretrained on a local path (model, tokenizer and processor files saved there)")
    kind = model_type(path)
    classes = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
    if kind not in classes:
        raise TokenmemError(f"{path!r} holds a {kind!r} model; Qwen2VLVideoQA takes {MODEL_TYPES} (use VideoQA "
                            "for LLaVA-NeXT-Video)")
    model = load_pretrained(classes[kind].from_pretrained, path, dtype=dtype, **kwargs).eval()
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path)
    template = tokenizer.chat_template
    legacy = os.path.join(path, "chat_template.json")
    if template is None and os.path.isfile(legacy):
        with open(legacy, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    return model, tokenizer, Qwen2VLFramePreprocessor.from_pretrained(path), template


class Qwen2VLVideoQA(VideoQA):
    """Question answering over videos with a Qwen2-VL (or Qwen2.5-VL) model and a bounded memory.

    Arguments as :class:`~tokenmem.adapters.video.VideoQA`; ``preprocessor`` is a
    :class:`~tokenmem.adapters.qwen2vl_frames.Qwen2VLFramePreprocessor`. ``frames`` sampled from a path are
    rounded by the preprocessor's padding: an odd count repeats the last frame to fill the last temporal patch.
    """

    load_model = staticmethod(load_qwen2_vl)

    def __init__(self, model, evictor="full", budget=None, **kwargs):
        if not isinstance(model, (str, os.PathLike)) and getattr(model.config, "model_type", None) not in MODEL_TYPES:
            raise TokenmemError(f"Qwen2VLVideoQA takes a Qwen2-VL or Qwen2.5-VL model, got "
                                f"{type(model).__name__}; use VideoQA for LLaVA-NeXT-Video")
        super().__init__(model, evictor, budget, **kwargs)
        if not isinstance(self.preprocessor, Qwen2VLFramePreprocessor):
            raise TokenmemError("Qwen2VLVideoQA needs a Qwen2VLFramePreprocessor as preprocessor= "
                                "(Qwen2VLFramePreprocessor.from_pretrained(path))")
        merge = self.model.config.vision_config.spatial_merge_size
        if self.preprocessor.config["merge_size"] != merge or (
                self.preprocessor.config["patch_size"] != self.model.config.vision_config.patch_size):
            raise TokenmemError(f"the preprocessor's patch/merge sizes {self.preprocessor.config['patch_size']}/"
                                f"{self.preprocessor.config['merge_size']} differ from the vision tower's "
                                f"{self.model.config.vision_config.patch_size}/{merge}; load the model's own "
                                "video_preprocessor_config.json")

    def _tokens_per_frame(self) -> None:
        return None  # depends on the video's size: see encode()

    def prompt(self, question: str) -> str:
        if not isinstance(question, str) or not question.strip():
            raise TokenmemError(f"a question must be a non-empty string, got {question!r}")
        if self.chat_template is None:
            return FALLBACK_PROMPT.replace("<|video_pad|>", self.video_token).replace("{question}", question)
        return super().prompt(question)

    def encode(self, clips: list[Clip], questions: list[str]) -> VideoInputs:
        """Token ids (the video placeholder expanded to temporal patches x tokens per patch, left padding),
        patches, ``video_grid_thw``, ``mm_token_type_ids`` and metadata."""
        shapes = {tuple(c.frames.shape[:3]) for c in clips}
        if len(shapes) != 1:
            raise TokenmemError(f"the videos of one batch must have the same number and size of frames, got "
                                f"{sorted(shapes)}; sample them alike (or ask them one by one)")
        if next(iter(shapes))[0] == 0:
            raise InputError("the video has no frames; give at least one frame")
        encoded = [self.preprocessor(c.frames) for c in clips]
        grid = encoded[0][1]
        patches, per_patch = grid[0], grid[1] * grid[2] // self.preprocessor.config["merge_size"] ** 2
        ids, mask, is_video = self._tokenize(questions, patches * per_patch)
        meta = self._meta(ids, mask, is_video, tokens_per_segment=per_patch)
        pixels = torch.cat([p for p, _ in encoded]).to(self.model.dtype)
        extra = {"video_grid_thw": torch.tensor([grid] * len(clips)), "mm_token_type_ids": is_video.long() * 2}
        return VideoInputs(ids, mask, pixels, meta, patches, per_patch, extra=extra,
                           frames_per_segment=self.preprocessor.config["temporal_patch_size"])

    def prompt_of(self, inputs: VideoInputs) -> Prompt:
        """The model's prompt: ids, mask, metadata, the patches and grid for an unprefilled ``generate``; with a
        ``prefill_chunk`` also the M-RoPE position ids (``get_rope_index``; the model's ``rope_deltas`` are set for
        the tokens generated after the prompt) and the input embeddings with the video features placed as
        ``Qwen2VLModel.forward`` places them."""
        device = self.model.device
        extra = {k: v.to(device) for k, v in inputs.extra.items()}
        pixels = inputs.pixel_values_videos.to(device)
        prompt = Prompt(inputs.input_ids.to(device), inputs.attention_mask.to(device), meta=inputs.meta,
                        model_inputs={"pixel_values_videos": pixels, **extra})
        if self.prefill_chunk is not None:
            inner = self.model.model
            positions, _ = inner.get_rope_index(prompt.input_ids, video_grid_thw=extra["video_grid_thw"],
                                                attention_mask=prompt.attention_mask,
                                                mm_token_type_ids=extra["mm_token_type_ids"])
            # generate continues each row one position after the prompt's last token (its own whole-prompt path
            # steps position_ids by one); get_rope_index's deltas count from the largest position instead, which
            # differs when a video's temporal positions pass the last text token (Qwen2.5-VL's time spacing)
            last = positions[0, :, -1:]  # [b, 1]: left padding, so the last column is real; text: equal axes
            inner.rope_deltas = last + 1 - prompt.attention_mask.sum(-1, keepdim=True).to(last.dtype)
            embeds = self.model.get_input_embeddings()(prompt.input_ids)
            features = inner.get_video_features(pixels, extra["video_grid_thw"], return_dict=True).pooler_output
            features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
            video = (prompt.input_ids == self.video_token_id)[..., None].expand_as(embeds)
            prompt.inputs_embeds = embeds.masked_scatter(video, features.to(embeds.dtype))
            prompt.position_ids = positions
        return prompt


def video_qa(model, evictor="full", budget=None, **kwargs) -> VideoQA:
    """A :class:`VideoQA` (LLaVA-NeXT-Video) or :class:`Qwen2VLVideoQA` (Qwen2-VL, Qwen2.5-VL) for a model
    directory or a loaded model, chosen by the model's type."""
    if isinstance(model, (str, os.PathLike)):
        kind = model_type(os.fspath(model))
    else:
        kind = getattr(getattr(model, "config", None), "model_type", None)
    cls = Qwen2VLVideoQA if kind in MODEL_TYPES else VideoQA
    return cls(model, evictor, budget, **kwargs)
