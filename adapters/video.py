"""LLaVA-NeXT-Video adapter: video question answering under a bounded, frame-aware TokenMemory.

- frames: :func:`~tokenmem.adapters.video_io.read_video` (decord; PyAV as the fallback);
- pixels and placeholder tokens: :mod:`~tokenmem.adapters.video_frames` (the steps of
  ``LlavaNextVideoProcessor`` in plain torch, proven equal to it where torchvision imports);
- model: the real ``LlavaNextVideoForConditionalGeneration.from_pretrained`` on a local path. Only its
  language model is switched to the ``"tokenmem"`` attention; the vision tower keeps its own;
- memories, chunked prefill, generation and the metadata rules come from the adapter base
  (:mod:`~tokenmem.adapters.base`); this module adds frames, pixels and the placement of video features;
- metadata (``memory.annotate``): every video token gets modality ``"frame"``, segment = frame index and, in
  the ``token`` field, its index inside the frame (row-major over the pooled patch grid; all video tokens
  share one input id, so the field carries no other information for them). Text tokens get modality
  ``"text"``, segment -1, their input id, and the ``separator`` flag for SepLLM; with ``protect_question``
  the prompt tokens after the video (the question and ``ASSISTANT:``) are flagged ``protect``;
- ``evict_unit="frame"`` keeps or drops whole frames (``TokenMemory(evict_unit="segment")``), ``"token"``
  lets the evictor choose single tokens.

>>> qa = VideoQA("path/to/llava-next-video", evictor="h2o", budget=0.25, evict_unit="frame")
>>> answer = qa.ask("clip.mp4", "What is moving?")
>>> print(answer.text); print(answer.memory.summary()); print(answer.report.table())
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenmem.errors import InputError, TokenmemError
from tokenmem.files import load_pretrained
from tokenmem.memory import TokenMemory
from tokenmem.meta import TokenMeta

from .base import Adapter, Prompt, check_chunk, prompt_meta
from .text import prepare_tokenizer
from .video_frames import FramePreprocessor, video_token_count
from .video_io import Clip, read_video
from .video_report import FrameReport

QWEN2VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # the model types tokenmem.adapters.qwen2vl answers with
EVICT_UNITS = {"token": "token", "frame": "segment"}  # adapter option -> TokenMemory(evict_unit=...)
FALLBACK_PROMPT = "USER: <video>\n{question} ASSISTANT:"
# The prompt format of the LLaVA-NeXT-Video checkpoints ("USER: <video>\n{question} ASSISTANT:") as a chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for c in message['content'] if c['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }} {% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def load_llava_next_video(path: str, *, dtype: torch.dtype | str = torch.float32, **kwargs):
    """``(model, tokenizer, preprocessor, chat_template)`` from a local LLaVA-NeXT-Video directory."""
    from transformers import AutoTokenizer, LlavaNextVideoForConditionalGeneration

    if not os.path.isdir(path):
        raise TokenmemError(f"model path {path!r} is not a local directory; tokenmem loads models with "
                            "from_pretrained on a local path (model, tokenizer and processor files saved there)")
    kind = model_type(path)
    if kind in QWEN2VL_MODEL_TYPES:
        raise TokenmemError(f"{path!r} holds a {kind!r} model: use tokenmem.adapters.qwen2vl.Qwen2VLVideoQA (or "
                            "video_qa(path, ...), which picks the adapter by the model's type)")
    model = load_pretrained(LlavaNextVideoForConditionalGeneration.from_pretrained, path, dtype=dtype, **kwargs).eval()
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path)
    template = tokenizer.chat_template
    legacy = os.path.join(path, "chat_template.json")  # processors saved by transformers 4.x
    if template is None and os.path.isfile(legacy):
        with open(legacy, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    return model, tokenizer, FramePreprocessor.from_pretrained(path), template


def model_type(path: str) -> str | None:
    """``model_type`` of the ``config.json`` in a local model directory (None without one)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f).get("model_type")
        except json.JSONDecodeError as e:
            raise TokenmemError(f"{file} is not valid JSON ({e}); restore the model's config.json") from None


@dataclass
class VideoInputs:
    input_ids: torch.Tensor  # [b, q]
    attention_mask: torch.Tensor  # [b, q]
    pixel_values_videos: torch.Tensor  # [b, frames, 3, H, W]
    meta: TokenMeta  # fields [b, q]
    frames: int  # segments of the video: frames (LLaVA), temporal patches (Qwen2-VL)
    tokens_per_frame: int  # language-model tokens per segment
    extra: dict = field(default_factory=dict)  # more model inputs (Qwen2-VL: video_grid_thw, mm_token_type_ids)
    frames_per_segment: int = 1  # video frames per segment (2: a Qwen2-VL temporal patch)


@dataclass
class Answer:
    text: str
    tokens: torch.Tensor  # [new] generated ids (padding after an early end included)
    report: FrameReport  # what the memory held of this row's video, per layer and frame
    memory: TokenMemory  # shared by the rows of one ask_many call
    clip: Clip | None = None

    def __str__(self) -> str:
        return self.text


class VideoQA(Adapter):
    """Question answering over videos with a LLaVA-NeXT-Video model and a bounded memory.

    Args:
        model: a local model directory, or a loaded ``LlavaNextVideoForConditionalGeneration`` (then give
            ``tokenizer`` and ``preprocessor``).
        evictor, budget, interval, positions, evictor_options: as :class:`~tokenmem.TokenMemory`.
        evict_unit: ``"token"`` or ``"frame"`` (whole frames kept or dropped).
        protect_question: always keep the prompt tokens after the video (the question).
        frames / fps / reader: how videos given as paths are sampled (see :func:`read_video`).
        prefill_chunk: feed the prompt in chunks of this many tokens, evicting after each, so the memory never
            holds more than ``budget + prefill_chunk`` tokens (the vision tower still encodes all frames at once).
    """

    def __init__(self, model, evictor="full", budget=None, *, tokenizer=None, preprocessor=None, chat_template=None,
                 interval: int | None = None, positions: str = "original", evict_unit: str = "token",
                 protect_question: bool = True, frames: int = 32, fps: float | None = None, reader: str = "auto",
                 prefill_chunk: int | None = None, dtype: torch.dtype | str = torch.float32, **evictor_options):
        if isinstance(model, (str, os.PathLike)):
            model, tokenizer, preprocessor, chat_template = self.load_model(os.fspath(model), dtype=dtype)
        elif tokenizer is None or preprocessor is None:
            raise TokenmemError("give tokenizer= and preprocessor= with a loaded model (or pass a model directory)")
        if evict_unit not in EVICT_UNITS:
            raise TokenmemError(f"evict_unit must be one of {tuple(EVICT_UNITS)}, got {evict_unit!r}")
        if prefill_chunk is not None:
            check_chunk(prefill_chunk, "prefill_chunk")
        super().__init__(model, tokenizer, memory_model=model.get_decoder(), memory_options=dict(
            evictor=evictor, budget=budget, interval=interval, positions=positions,
            evict_unit=EVICT_UNITS[evict_unit], **evictor_options))
        self.preprocessor = preprocessor
        self.chat_template = chat_template
        prepare_tokenizer(tokenizer)
        self.video_token_id = int(model.config.video_token_id)
        self.video_token = tokenizer.convert_ids_to_tokens(self.video_token_id)
        self.tokens_per_frame = self._tokens_per_frame()
        self.protect_question = protect_question
        self.sampling = dict(num_frames=frames, fps=fps, reader=reader)
        self.prefill_chunk = prefill_chunk
        self.separators  # computed now, not at the first question
        self.memory()  # validates the options now (and prepares the language model) rather than at the first ask

    load_model = staticmethod(load_llava_next_video)  # (path, dtype=) -> model, tokenizer, preprocessor, template

    def _tokens_per_frame(self) -> int | None:
        """Language-model tokens per frame (None when they depend on the video's size)."""
        return video_token_count(self.model.config, self.preprocessor.crop)

    # -- inputs ------------------------------------------------------------------------------------
    def load(self, video) -> Clip:
        """A :class:`Clip` from a path (sampled with this QA's options), a Clip, or uint8 frames [T, H, W, 3]."""
        if isinstance(video, Clip):
            return video
        if isinstance(video, (str, os.PathLike)):
            return read_video(video, self.sampling["num_frames"], fps=self.sampling["fps"],
                              reader=self.sampling["reader"])
        frames = np.asarray(video)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise TokenmemError(f"a video is a file path, a Clip, or uint8 frames [T, H, W, 3]; got {frames.shape} "
                                f"{frames.dtype}")
        if frames.shape[0] == 0:
            raise InputError(f"the video has no frames (frames of shape {frames.shape}); give at least one frame")
        n = frames.shape[0]
        return Clip(frames=frames, timestamps=np.arange(n, dtype=np.float64), indices=np.arange(n), fps=1.0,
                    total_frames=n)

    def prompt(self, question: str) -> str:
        """The chat prompt with one ``<video>`` placeholder (the model's chat template when it has one)."""
        if not isinstance(question, str) or not question.strip():
            raise TokenmemError(f"a question must be a non-empty string, got {question!r}")
        if self.chat_template is None:
            return FALLBACK_PROMPT.replace("<video>", self.video_token).replace("{question}", question)
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)

    def encode(self, clips: list[Clip], questions: list[str]) -> VideoInputs:
        """Token ids (``<video>`` expanded to frames x tokens per frame, left padding), pixels and metadata."""
        counts = {c.num_frames for c in clips}
        if len(counts) != 1:
            raise TokenmemError(f"the videos of one batch must have the same number of frames, got {sorted(counts)}; "
                                "sample them with the same frames= (or ask them one by one)")
        frames = counts.pop()
        if frames == 0:
            raise InputError("the video has no frames; give at least one frame")
        pixels = torch.stack([self.preprocessor(c.frames) for c in clips]).to(self.model.dtype)
        ids, mask, is_video = self._tokenize(questions, frames * self.tokens_per_frame)
        return VideoInputs(ids, mask, pixels, self._meta(ids, mask, is_video), frames, self.tokens_per_frame)

    def _tokenize(self, questions: list[str], count: int):
        """``(ids, mask, is_video)`` ``[b, q]`` of the prompts, their one video placeholder expanded to ``count``
        video tokens (left padding); a prompt without exactly one placeholder, or a tokenizer that splits it, is
        refused."""
        texts = []
        for question in questions:
            text = self.prompt(question)
            if text.count(self.video_token) != 1:
                raise TokenmemError(f"the prompt must hold exactly one {self.video_token!r} placeholder, got "
                                    f"{text.count(self.video_token)} in {text!r}")
            texts.append(text.replace(self.video_token, self.video_token * count))
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        is_video = ids == self.video_token_id
        found = is_video.sum(-1)
        if bool((found != count).any()):
            raise TokenmemError(f"the tokenizer split the video placeholder: expected {count} video tokens per "
                                f"prompt, got {found.tolist()}; {self.video_token!r} must be a special token of the "
                                "tokenizer")
        return ids, mask, is_video

    def _meta(self, ids, mask, is_video, tokens_per_segment: int | None = None) -> TokenMeta:
        return prompt_meta(ids, mask, self.separators, media=is_video,
                           tokens_per_segment=tokens_per_segment or self.tokens_per_frame, modality="frame",
                           protect_after_media=self.protect_question)

    # -- answering ---------------------------------------------------------------------------------
    def memory(self, **options) -> TokenMemory:
        """A fresh TokenMemory on the language model (the vision tower keeps its own attention)."""
        return super().memory(**options)

    def ask(self, video, question: str, **kwargs) -> Answer:
        """Answer one question about one video (path, Clip or frames); see :meth:`ask_many`."""
        return self.ask_many([video], [question], **kwargs)[0]

    @torch.no_grad()
    def ask_many(self, videos, questions, *, max_new_tokens: int = 32, memory: TokenMemory | None = None,
                 **generate_kwargs) -> list[Answer]:
        """Answer ``questions[i]`` about ``videos[i]`` in one batch (greedy unless told otherwise)."""
        if isinstance(questions, str) or len(videos) != len(questions) or not videos:
            raise TokenmemError("ask_many takes a list of videos and a list of questions of the same, non-zero length")
        clips = [self.load(v) for v in videos]
        inputs = self.encode(clips, list(questions))
        memory = self.memory() if memory is None else memory
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        prompt = self.prompt_of(inputs)
        out = self.generate_prompt(prompt, memory, prefill_chunk=self.prefill_chunk, max_new_tokens=max_new_tokens,
                                   **generate_kwargs)
        new = out[:, prompt.length:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [Answer(text=texts[r], tokens=new[r], memory=memory, clip=clips[r],
                       report=FrameReport.from_memory(memory, r, inputs.frames, inputs.tokens_per_frame,
                                                     inputs.frames_per_segment))
                for r in range(len(clips))]

    def prompt_of(self, inputs: VideoInputs) -> Prompt:
        """The model's prompt: ids, mask, metadata, the pixels for an unprefilled ``generate``, and (with a
        ``prefill_chunk``) the input embeddings with the video features placed as ``LlavaNextVideoModel.forward``
        places them."""
        device = self.model.device
        pixels = inputs.pixel_values_videos.to(device)
        prompt = Prompt(inputs.input_ids.to(device), inputs.attention_mask.to(device), meta=inputs.meta,
                        model_inputs={"pixel_values_videos": pixels})
        if self.prefill_chunk is not None:
            embeds = self.model.get_input_embeddings()(prompt.input_ids)  # [b, q, d]
            features = self.model.get_video_features(pixel_values_videos=pixels,
                                                     return_dict=True).pooler_output  # [b, frames * tokens, d]
            video = (prompt.input_ids == self.video_token_id)[..., None].expand_as(embeds)
            prompt.inputs_embeds = embeds.masked_scatter(video, features.to(embeds.dtype))
        return prompt
