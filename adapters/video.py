"""LLaVA-NeXT-Video adapter: video question answering under a bounded, frame-aware TokenMemory.

- frames: :func:`~tokenmem.adapters.video_io.read_video` (decord; PyAV as the fallback);
- pixels and placeholder tokens: :mod:`~tokenmem.adapters.video_frames` (the steps of
  ``LlavaNextVideoProcessor`` in plain torch, proven equal to it where torchvision imports);
- model: the real ``LlavaNextVideoForConditionalGeneration.from_pretrained`` on a local path. Only its
  language model is switched to the ``"tokenmem"`` attention; the vision tower keeps its own;
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
from dataclasses import dataclass

import numpy as np
import torch

from tokenmem.errors import TokenmemError
from tokenmem.memory import TokenMemory
from tokenmem.meta import MODALITIES, PROTECT, SEPARATOR, TokenMeta

from .text import prepare_tokenizer, separator_ids
from .video_frames import FramePreprocessor, video_token_count
from .video_io import Clip, read_video
from .video_report import FrameReport

EVICT_UNITS = {"token": "token", "frame": "segment"}  # adapter option -> TokenMemory(evict_unit=...)
FALLBACK_PROMPT = "USER: <video>\n{question} ASSISTANT:"


def load_llava_next_video(path: str, *, dtype: torch.dtype | str = torch.float32, **kwargs):
    """``(model, tokenizer, preprocessor, chat_template)`` from a local LLaVA-NeXT-Video directory."""
    from transformers import AutoTokenizer, LlavaNextVideoForConditionalGeneration

    if not os.path.isdir(path):
        raise TokenmemError(f"model path {path!r} is not a local directory; tokenmem loads models with "
                            "from_pretrained on a local path (model, tokenizer and processor files saved there)")
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(path, dtype=dtype, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = tokenizer.chat_template
    legacy = os.path.join(path, "chat_template.json")  # processors saved by transformers 4.x
    if template is None and os.path.isfile(legacy):
        with open(legacy, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    return model, tokenizer, FramePreprocessor.from_pretrained(path), template


@dataclass
class VideoInputs:
    input_ids: torch.Tensor  # [b, q]
    attention_mask: torch.Tensor  # [b, q]
    pixel_values_videos: torch.Tensor  # [b, frames, 3, H, W]
    meta: TokenMeta  # fields [b, q]
    frames: int
    tokens_per_frame: int


@dataclass
class Answer:
    text: str
    tokens: torch.Tensor  # [new] generated ids (padding after an early end included)
    report: FrameReport  # what the memory held of this row's video, per layer and frame
    memory: TokenMemory  # shared by the rows of one ask_many call
    clip: Clip | None = None

    def __str__(self) -> str:
        return self.text


class VideoQA:
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
            model, tokenizer, preprocessor, chat_template = load_llava_next_video(os.fspath(model), dtype=dtype)
        elif tokenizer is None or preprocessor is None:
            raise TokenmemError("give tokenizer= and preprocessor= with a loaded model (or pass a model directory)")
        if evict_unit not in EVICT_UNITS:
            raise TokenmemError(f"evict_unit must be one of {tuple(EVICT_UNITS)}, got {evict_unit!r}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise TokenmemError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk!r}")
        self.model, self.tokenizer, self.preprocessor = model, tokenizer, preprocessor
        self.chat_template = chat_template
        prepare_tokenizer(tokenizer)
        self.video_token_id = int(model.config.video_token_id)
        self.video_token = tokenizer.convert_ids_to_tokens(self.video_token_id)
        self.tokens_per_frame = video_token_count(model.config, preprocessor.crop)
        self.memory_options = dict(evictor=evictor, budget=budget, interval=interval, positions=positions,
                                   evict_unit=EVICT_UNITS[evict_unit], **evictor_options)
        self.protect_question = protect_question
        self.sampling = dict(num_frames=frames, fps=fps, reader=reader)
        self.prefill_chunk = prefill_chunk
        self.separators = separator_ids(tokenizer)
        self.memory()  # validates the options now (and prepares the language model) rather than at the first ask

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
        pixels = torch.stack([self.preprocessor(c.frames) for c in clips]).to(self.model.dtype)
        texts = []
        for question in questions:
            text = self.prompt(question)
            if text.count(self.video_token) != 1:
                raise TokenmemError(f"the prompt must hold exactly one {self.video_token!r} placeholder, got "
                                    f"{text.count(self.video_token)} in {text!r}")
            texts.append(text.replace(self.video_token, self.video_token * (frames * self.tokens_per_frame)))
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        is_video = ids == self.video_token_id
        found = is_video.sum(-1)
        if bool((found != frames * self.tokens_per_frame).any()):
            raise TokenmemError(f"the tokenizer split the video placeholder: expected {frames * self.tokens_per_frame} "
                                f"video tokens per prompt, got {found.tolist()}; {self.video_token!r} must be a "
                                "special token of the tokenizer")
        return VideoInputs(ids, mask, pixels, self._meta(ids, mask, is_video), frames, self.tokens_per_frame)

    def _meta(self, ids, mask, is_video) -> TokenMeta:
        b, q = ids.shape
        rank = is_video.long().cumsum(-1) - 1  # index among the row's video tokens
        slot = torch.arange(q).expand(b, q)
        last_video = torch.where(is_video, slot, -1).amax(-1, keepdim=True)
        flags = torch.isin(ids, torch.tensor(self.separators, dtype=torch.long)) & ~is_video
        flags = flags.long() * SEPARATOR
        if self.protect_question:
            question = ~is_video & (slot > last_video) & mask.bool()
            flags |= question.long() * PROTECT
        return TokenMeta.build(
            b, q,
            modality=torch.where(is_video, MODALITIES["frame"], MODALITIES["text"]),
            segment=torch.where(is_video, rank // self.tokens_per_frame, -1),
            token=torch.where(is_video, rank % self.tokens_per_frame, ids),
            flags=flags,
        )

    # -- answering ---------------------------------------------------------------------------------
    def memory(self) -> TokenMemory:
        """A fresh TokenMemory on the language model (the vision tower keeps its own attention)."""
        options = dict(self.memory_options)
        return TokenMemory(self.model.get_decoder(), options.pop("evictor"), options.pop("budget"),
                           options.pop("interval"), options.pop("positions"), separator_ids=self.separators,
                           **options)

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
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        ids, mask = inputs.input_ids.to(self.model.device), inputs.attention_mask.to(self.model.device)
        if self.prefill_chunk is None:
            memory.annotate(inputs.meta)
            out = self.model.generate(input_ids=ids, attention_mask=mask, past_key_values=memory,
                                      pixel_values_videos=inputs.pixel_values_videos.to(self.model.device),
                                      max_new_tokens=max_new_tokens, **generate_kwargs)
        else:
            self._prefill(inputs, memory)
            out = self.model.generate(input_ids=ids, attention_mask=mask, past_key_values=memory,
                                      max_new_tokens=max_new_tokens, **generate_kwargs)
        new = out[:, ids.shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [Answer(text=texts[r], tokens=new[r], memory=memory, clip=clips[r],
                       report=FrameReport.from_memory(memory, r, inputs.frames, inputs.tokens_per_frame))
                for r in range(len(clips))]

    def _prefill(self, inputs: VideoInputs, memory: TokenMemory) -> None:
        """Feed all but the last prompt token as embeddings in chunks (generate continues from the last one);
        video features are placed as ``LlavaNextVideoModel.forward`` places them."""
        model, device = self.model, self.model.device
        ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
        embeds = model.get_input_embeddings()(ids)  # [b, q, d]
        features = model.get_video_features(pixel_values_videos=inputs.pixel_values_videos.to(device),
                                            return_dict=True).pooler_output  # [b, frames * tokens, d]
        video = (ids == self.video_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(video, features.to(embeds.dtype))
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        total, chunk = ids.shape[1] - 1, self.prefill_chunk
        for start in range(0, total, chunk):
            end = min(total, start + chunk)
            memory.annotate(_slice(inputs.meta, start, end))
            model(inputs_embeds=embeds[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                  past_key_values=memory, use_cache=True, logits_to_keep=1)
        memory.annotate(_slice(inputs.meta, total, total + 1))  # generate's first call: the last prompt token


def _slice(meta: TokenMeta, start: int, end: int) -> TokenMeta:
    return TokenMeta.from_packed(meta.pack()[:, start:end])
