"""The shipped tiny video-QA model's pieces (:mod:`tokenmem.zoo.train_video` trains it): its size
(:class:`Spec`), tokenizer, architecture (``LlavaNextVideoForConditionalGeneration`` with stdlib-llama as the
language model), processor files, and the :class:`Encoder` that turns clips and questions into training batches
the way :class:`~tokenmem.adapters.video.VideoQA` builds its prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmem.errors import TokenmemError

from . import video_task as task

PATCH = 8


@dataclass(frozen=True)
class Spec:
    """What the model and the task look like (a checkpoint is only resumed with the same spec)."""

    frames: int = 24
    size: int = 48
    vision_hidden: int = 64
    vision_layers: int = 2
    lm: str = "stdlib"  # "stdlib": initialise from the shipped stdlib-llama; "tiny": a random 2-layer Llama (tests)
    arch: str = "llava"  # "llava": LlavaNextVideoForConditionalGeneration; "qwen2vl": Qwen2VLForConditionalGeneration
    mrope_section: tuple | None = None  # Qwen2-VL: rotary frequencies per (t, h, w) axis; None: qwen2vl_model's

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise TokenmemError(f"unknown video model architecture {self.arch!r}; use one of {ARCHS}")

    @property
    def tokens_per_frame(self) -> int:
        """Language-model tokens per segment: a frame (LLaVA), a temporal patch of two frames (Qwen2-VL)."""
        if self.arch == "qwen2vl":
            from .qwen2vl_model import tokens_per_temporal_patch

            return tokens_per_temporal_patch()
        return (self.size // PATCH // 2) ** 2

    @property
    def segments(self) -> int:
        """Segments of a clip: frames (LLaVA), temporal patches of two frames (Qwen2-VL)."""
        return -(-self.frames // 2) if self.arch == "qwen2vl" else self.frames

    @property
    def video_tokens(self) -> int:
        return self.segments * self.tokens_per_frame


ARCHS = ("llava", "qwen2vl")
TINY = dict(frames=16, vision_hidden=32, vision_layers=1, lm="tiny")


# -- the model -------------------------------------------------------------------------------------
def build_tokenizer(arch: str = "llava"):
    if arch == "qwen2vl":
        from .qwen2vl_model import build_tokenizer as build_qwen2vl_tokenizer

        return build_qwen2vl_tokenizer()
    from transformers import AutoTokenizer

    from tokenmem.adapters.video import CHAT_TEMPLATE

    from . import stdlib_lm_path

    tok = AutoTokenizer.from_pretrained(stdlib_lm_path())
    tok.add_tokens(["<image>", "<video>"], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(spec: Spec, tok, seed: int):
    """A LlavaNextVideoForConditionalGeneration for ``spec``; its language model copied from stdlib-llama."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaNextVideoConfig,
                              LlavaNextVideoForConditionalGeneration)

    from . import stdlib_lm_path

    if spec.arch == "qwen2vl":
        from .qwen2vl_model import build_model as build_qwen2vl

        return finish(build_qwen2vl(spec, tok, seed), tok)
    torch.manual_seed(seed)
    if spec.lm == "stdlib":
        lm = LlamaForCausalLM.from_pretrained(stdlib_lm_path(), dtype=torch.float32)
        lm.resize_token_embeddings(len(tok), mean_resizing=False)
        text = lm.config
    elif spec.lm == "tiny":
        lm = None
        text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    else:
        raise TokenmemError(f"unknown language model {spec.lm!r}; use 'stdlib' or 'tiny'")
    heads = max(1, spec.vision_hidden // 16)
    vision = CLIPVisionConfig(image_size=spec.size, patch_size=PATCH, hidden_size=spec.vision_hidden,
                              intermediate_size=2 * spec.vision_hidden, num_hidden_layers=spec.vision_layers,
                              num_attention_heads=heads, projection_dim=spec.vision_hidden)
    image_id, video_id = tok.convert_tokens_to_ids(["<image>", "<video>"])
    side = spec.size // PATCH
    config = LlavaNextVideoConfig(
        vision_config=vision, text_config=text, image_token_index=image_id, video_token_index=video_id,
        image_grid_pinpoints=[[spec.size, 2 * spec.size], [2 * spec.size, spec.size]],
        image_seq_length=side**2, video_seq_length=spec.tokens_per_frame, spatial_pool_stride=2,
        vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=True)
    model = LlavaNextVideoForConditionalGeneration(config)
    _fan_in_init(model)
    if lm is not None:
        model.model.language_model.load_state_dict(lm.model.state_dict())
    return finish(model, tok)


def finish(model, tok):
    """Tie the embeddings, set the generation config's special tokens from ``tok`` and sdpa attention."""
    model.tie_weights()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.config._attn_implementation = "sdpa"
    return model


@torch.no_grad()
def _fan_in_init(model) -> None:
    """LeCun fan-in initialisation (weights ~ N(0, 1 / fan_in), LeCun et al. 1998) for the new patch embedding and
    projector instead of the N(0, 0.02) of transformers: with 0.02 the video features start ~40x weaker across
    tokens than the text embeddings' scale (feature std 0.012 vs 0.05) and the two projector layers must grow
    through each other before the language model can tell one frame token from another."""
    patch = model.model.vision_tower.embeddings.patch_embedding  # Conv2d(3, hidden, PATCH, PATCH)
    torch.nn.init.normal_(patch.weight, std=(patch.in_channels * PATCH * PATCH) ** -0.5)
    for layer in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
        torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
        torch.nn.init.zeros_(layer.bias)


def frame_config(spec: Spec) -> dict:
    from tokenmem.adapters.video_frames import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return dict(size={"shortest_edge": spec.size}, crop_size={"height": spec.size, "width": spec.size},
                do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), resample=3, do_convert_rgb=True)


def save_pretrained(model, tok, spec: Spec, path: Path) -> None:
    """Model, tokenizer (with the chat template) and the processor files VideoQA and LlavaNextVideoProcessor read
    (Qwen2VLVideoQA and Qwen2VLProcessor for a Qwen2-VL spec)."""
    if spec.arch == "qwen2vl":
        from .qwen2vl_model import save_pretrained as save_qwen2vl

        return save_qwen2vl(model, tok, path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    frames = frame_config(spec)
    files = {
        "video_preprocessor_config.json": {**frames, "video_processor_type": "LlavaNextVideoVideoProcessor",
                                           "processor_class": "LlavaNextVideoProcessor"},
        "preprocessor_config.json": {**frames, "image_processor_type": "LlavaNextImageProcessor",
                                     "image_grid_pinpoints": model.config.image_grid_pinpoints,
                                     "processor_class": "LlavaNextVideoProcessor"},
        "processor_config.json": {"processor_class": "LlavaNextVideoProcessor", "patch_size": PATCH,
                                  "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
                                  "video_token": "<video>", "image_token": "<image>"},
    }
    for name, data in files.items():
        (path / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# -- batches ---------------------------------------------------------------------------------------
class Encoder:
    """Token ids of prompt + answer as VideoQA builds the prompt, and pixel values from the model's preprocessor.

    A Qwen2-VL spec needs ``model``: the M-RoPE position ids of the prompts come from its ``get_rope_index``."""

    def __init__(self, tok, spec: Spec, model=None):
        self.tok, self.spec = tok, spec
        if spec.arch == "qwen2vl":
            from tokenmem.adapters.qwen2vl_frames import Qwen2VLFramePreprocessor

            from .qwen2vl_model import VIDEO_PAD, frame_config as qwen2vl_frame_config

            if model is None:
                raise TokenmemError("a Qwen2-VL Encoder needs the model (its get_rope_index gives the positions)")
            self.preprocessor, placeholder = Qwen2VLFramePreprocessor(**qwen2vl_frame_config()), VIDEO_PAD
        else:
            from tokenmem.adapters.video_frames import FramePreprocessor

            self.preprocessor, placeholder = FramePreprocessor(**frame_config(spec)), "<video>"
        video = placeholder * spec.video_tokens
        self.prompts, self.positions = {}, {}
        for kind, question in task.QUESTIONS.items():
            conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
            text = tok.apply_chat_template(conversation, chat_template=tok.chat_template, add_generation_prompt=True,
                                           tokenize=False)
            self.prompts[kind] = tok(text.replace(placeholder, video))["input_ids"]
            if spec.arch == "qwen2vl":
                self.positions[kind] = self._mrope(model, self.prompts[kind])
        self.answers = {a: tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                        for answers in task.ANSWERS.values() for a in answers}

    def __call__(self, items: list[tuple[task.ShapeClip, str]]):
        """One sequence per ``(clip, question kind)``: the model's inputs (ids [b, q] right-padded, pixels
        [b, frames, 3, H, W]; no mask or positions needed, causal attention never reads the padding at the end)
        and labels [b, q] (-100 except the answer tokens)."""
        if self.spec.arch != "llava":
            raise TokenmemError("unpacked batches are built for LLaVA only; use Encoder.packed")
        rows = [self.prompts[kind] + self.answers[clip.answer(kind)] for clip, kind in items]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, ((clip, kind), row) in enumerate(zip(items, rows)):
            ids[r, : len(row)] = torch.tensor(row)
            start = len(self.prompts[kind])
            labels[r, start : len(row)] = ids[r, start : len(row)]
        return dict(input_ids=ids, pixel_values_videos=self.pixels([c for c, _ in items])), labels

    def pixels(self, clips) -> torch.Tensor:
        return torch.stack([self.preprocessor(clip.frames) for clip in clips])  # [b, frames, 3, H, W]

    def video_inputs(self, clips) -> dict:
        """The model's video inputs: ``pixel_values_videos`` [b, frames, 3, H, W] (LLaVA), or the patches of all
        clips [b * patches, 1176] with ``video_grid_thw`` [b, 3] (Qwen2-VL)."""
        if self.spec.arch == "llava":
            return dict(pixel_values_videos=self.pixels(clips))
        out = [self.preprocessor(clip.frames) for clip in clips]
        return dict(pixel_values_videos=torch.cat([p for p, _ in out]),
                    video_grid_thw=torch.tensor([g for _, g in out]))

    def _mrope(self, model, ids: list[int]) -> torch.Tensor:
        """``[3, q + answer room]`` M-RoPE positions of a prompt and of the tokens generated after it."""
        from .qwen2vl_model import prompt_positions

        grid = torch.tensor([self.preprocessor.grid(self.spec.frames, self.spec.size, self.spec.size)])
        prompt = torch.tensor([ids])
        positions, _ = prompt_positions(model, prompt, grid)  # [3, 1, q]
        last = int(positions[0, 0, -1])
        after = torch.arange(last + 1, last + 33)  # generate steps the answer tokens on from the prompt's last token
        return torch.cat([positions[:, 0], after.expand(3, -1)], dim=1)

    def packed(self, clips: list[task.ShapeClip]):
        """All questions of a clip in one row sharing the video: ``prefix | question 1 answer 1 | question 2 ...``,
        ``prefix`` being what all prompts share (``USER: <video>...``). A 4-D mask lets each question attend to the
        prefix and to itself only and its positions continue from the prefix, so each question sees exactly the
        sequence :class:`VideoQA` feeds (the packed logits equal the one-question ones: tested). This is the
        shared-prefix form of packed fine-tuning; here it cuts the tokens per question ~2.4x. Returns the model's
        inputs (with ``attention_mask`` [b, 1, q, q] bool and ``position_ids`` [b, q]) and labels [b, q]."""
        kinds = list(task.QUESTIONS)
        prefix = self.prefix
        axes = 3 if self.spec.arch == "qwen2vl" else 1  # M-RoPE position ids [3, b, q] for Qwen2-VL
        rows = []
        for clip in clips:
            ids, seg, lab = list(self.prompts[kinds[0]][:prefix]), [0] * prefix, [-100] * prefix
            pos = [self._positions(kinds[0], 0, prefix)]
            for s, kind in enumerate(kinds, 1):
                branch, answer = self.prompts[kind][prefix:], self.answers[clip.answer(kind)]
                ids += branch + answer
                seg += [s] * (len(branch) + len(answer))
                pos.append(self._positions(kind, prefix, len(self.prompts[kind]) + len(answer)))
                lab += [-100] * len(branch) + answer
            rows.append((ids, seg, torch.cat(pos, dim=-1), lab))
        b, width = len(rows), max(len(r[0]) for r in rows)
        ids = torch.full((b, width), self.tok.pad_token_id, dtype=torch.long)
        seg = torch.full((b, width), -1, dtype=torch.long)
        pos = torch.zeros((axes, b, width), dtype=torch.long)
        lab = torch.full((b, width), -100, dtype=torch.long)
        for r, (row_ids, row_seg, row_pos, row_lab) in enumerate(rows):
            n = len(row_ids)
            ids[r, :n], seg[r, :n], lab[r, :n] = torch.tensor(row_ids), torch.tensor(row_seg), torch.tensor(row_lab)
            pos[:, r, :n] = row_pos
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        visible = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)  # [b, query, key]
        mask = (causal & visible & (seg[:, None, :] >= 0)) | torch.eye(width, dtype=torch.bool)  # padding sees itself
        return dict(input_ids=ids, **self.video_inputs(clips), attention_mask=mask[:, None],
                    position_ids=pos if axes == 3 else pos[0]), lab

    def _positions(self, kind: str, start: int, end: int) -> torch.Tensor:
        """Positions ``[axes, end - start]`` of tokens ``start .. end - 1`` of ``kind``'s prompt followed by its
        answer, as inference gives them: ``arange`` (LLaVA), M-RoPE from ``get_rope_index`` and the tokens
        generated after the prompt at ``index + rope_delta`` (Qwen2-VL)."""
        if self.spec.arch == "qwen2vl":
            return self.positions[kind][:, start:end]
        return torch.arange(start, end)[None]

    @property
    def prefix(self) -> int:
        rows, n = list(self.prompts.values()), 0
        while all(len(r) > n for r in rows) and len({r[n] for r in rows}) == 1:
            n += 1
        return n
