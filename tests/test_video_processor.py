"""Our frame preprocessing and placeholder expansion give exactly what transformers' own processors give.

- LLaVA-NeXT-Video: :class:`FramePreprocessor` and ``VideoQA.encode`` against ``LlavaNextVideoProcessor``;
- Qwen2-VL: :class:`Qwen2VLFramePreprocessor` (``smart_resize``, ``patchify``) against ``Qwen2VLVideoProcessor``
  (patches, ``video_grid_thw``: the shipped 84 x 84 settings, Qwen2-VL's defaults, non-square and downscaled
  frames, the per-frame pixel cap) and ``Qwen2VLVideoQA.encode`` against ``Qwen2VLProcessor`` (ids, mask, patches,
  grid and the video token count it inserts).

The HF video processors need torchvision, which does not import beside the CPU build of torch 2.13 used by
the main test environment: these tests run in the ``.venv-vision`` environment of ``scripts/test.sh``
(torch 2.14.1 + torchvision 0.29.1) and are skipped elsewhere.
"""

import numpy as np
import pytest
import torch

from tokenmem.adapters.qwen2vl_frames import Qwen2VLFramePreprocessor, patchify, smart_resize
from tokenmem.adapters.video_frames import FramePreprocessor
from video_support import tiny_llava_dir  # noqa: F401  (fixture)


def _torchvision_or_skip():
    try:
        import torchvision  # noqa: F401
        from torchvision.transforms.v2 import functional  # noqa: F401
    except Exception as exc:  # ImportError, or RuntimeError from a torchvision built for another torch
        pytest.skip(f"torchvision does not import here ({type(exc).__name__}); runs in scripts/test.sh's .venv-vision")


def random_frames(n, height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("height,width", [(48, 64), (64, 40), (16, 16), (9, 30)])
def test_frames_equal_hf_video_processor_on_the_tiny_model(tiny_llava_dir, height, width):  # noqa: F811
    _torchvision_or_skip()
    from transformers import LlavaNextVideoProcessor

    processor = LlavaNextVideoProcessor.from_pretrained(tiny_llava_dir)
    frames = random_frames(5, height, width, seed=height * width)
    theirs = processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
    ours = FramePreprocessor.from_pretrained(tiny_llava_dir)(frames)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("height,width", [(360, 640), (480, 360)])
def test_frames_equal_hf_video_processor_at_the_7b_settings(height, width):
    """The released LLaVA-NeXT-Video-7B frame settings: shortest edge 336, 336 x 336 center crop, CLIP mean/std."""
    _torchvision_or_skip()
    from transformers import LlavaNextVideoVideoProcessor

    config = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3)
    frames = random_frames(3, height, width, seed=width)
    theirs = LlavaNextVideoVideoProcessor(**config)(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
    ours = FramePreprocessor(**config)(frames)
    assert ours.shape == (3, 3, 336, 336)
    assert torch.equal(ours, theirs)


def test_prompt_ids_equal_hf_processor(tiny_llava_dir):  # noqa: F811
    """A batch of two videos and questions of different lengths: same ids, mask and pixels as the processor."""
    _torchvision_or_skip()
    from transformers import LlavaNextVideoProcessor

    from tokenmem.adapters import VideoQA

    processor = LlavaNextVideoProcessor.from_pretrained(tiny_llava_dir)
    processor.tokenizer.padding_side = "left"
    qa = VideoQA(tiny_llava_dir)
    videos = [random_frames(6, 48, 64, seed=1), random_frames(6, 40, 40, seed=2)]
    questions = ["What is moving?", "Which colour is the square, and where does it go?"]
    conversations = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}] for q in questions]
    prompts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    assert prompts == [qa.prompt(q) for q in questions]
    theirs = processor(text=prompts, videos=videos, padding=True, return_tensors="pt")
    ours = qa.encode([qa.load(v) for v in videos], questions)
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"])
    assert torch.equal(ours.pixel_values_videos, theirs["pixel_values_videos"])


# -- Qwen2-VL: Qwen2VLFramePreprocessor against Qwen2VLVideoProcessor / Qwen2VLProcessor ----------------------------
QWEN2VL_SMALL = dict(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})  # the max branch of smart_resize


def _qwen2vl_equal_to_hf(config, frames):
    """Assert our patches and grid equal Qwen2VLVideoProcessor(**config)'s on one clip; return our grid."""
    _torchvision_or_skip()
    from transformers import Qwen2VLVideoProcessor

    theirs = Qwen2VLVideoProcessor(**config)(videos=[frames], return_tensors="pt")
    pixels, grid = Qwen2VLFramePreprocessor(**config)(frames)
    assert pixels.dtype == theirs["pixel_values_videos"].dtype
    assert pixels.shape == theirs["pixel_values_videos"].shape
    assert torch.equal(pixels, theirs["pixel_values_videos"])
    assert theirs["video_grid_thw"].tolist() == [list(grid)]
    return grid


def test_qwen2vl_smart_resize_equals_hf():
    """smart_resize gives transformers' sizes over small, large, thin and in-range frames and several pixel bounds."""
    _torchvision_or_skip()
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize as hf_smart_resize

    sides = [1, 7, 14, 27, 28, 29, 48, 55, 56, 84, 100, 200, 333, 1000, 4000]
    bounds = [(56 * 56, 112 * 112), (84 * 84, 84 * 84), (128 * 28 * 28, 28 * 28 * 768), (3136, 12845056)]
    for h in sides:
        for w in sides:
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in bounds:
                assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


@pytest.mark.parametrize("frames,merge", [(5, 2), (4, 2), (3, 1)])
def test_qwen2vl_patchify_equals_hf(frames, merge):
    """patchify orders the rows and columns as transformers' patchify (non-square grid, odd frame count padded)."""
    _torchvision_or_skip()
    from transformers import Qwen2VLVideoProcessor

    video = torch.randn(frames, 3, 4 * 14, 6 * 14, generator=torch.Generator().manual_seed(frames))
    theirs, *grid = Qwen2VLVideoProcessor().patchify(video[None], patch_size=14, merge_size=merge,
                                                      temporal_patch_size=2)
    ours = patchify(video, 14, merge, 2)
    assert grid == [-(-frames // 2), 4, 6]
    assert torch.equal(ours, theirs[0])


@pytest.mark.parametrize("frames", [24, 5])
def test_qwen2vl_frames_equal_hf_at_the_shipped_settings(frames):
    """The shipped model's frame_config(): 48 px frames -> 84 x 84, 3 x 3 tokens per temporal patch; an odd count
    repeats the last frame as transformers does."""
    from tokenmem.zoo.qwen2vl_model import frame_config

    grid = _qwen2vl_equal_to_hf(frame_config(), random_frames(frames, 48, 48, seed=frames))
    assert grid == (-(-frames // 2), 6, 6)
    assert Qwen2VLFramePreprocessor(**frame_config()).tokens(frames, 48, 48) == (-(-frames // 2), 9)


@pytest.mark.parametrize("config", [{}, QWEN2VL_SMALL], ids=["defaults", "small-max-pixels"])
@pytest.mark.parametrize("height,width", [(60, 100), (300, 200)])
def test_qwen2vl_frames_equal_hf_on_non_square_frames(config, height, width):
    """Non-square frames, upscaled to Qwen2-VL's default min_pixels or downscaled by a small max_pixels."""
    frames = random_frames(3, height, width, seed=height + width)
    t, h, w = _qwen2vl_equal_to_hf(config, frames)
    if config and height * width > 112 * 112:
        assert h * w * 14 * 14 <= 112 * 112 < height * width  # smart_resize's max branch ran
    assert (t, h * w // 4) == Qwen2VLFramePreprocessor(**config).tokens(3, height, width)


@pytest.mark.parametrize("max_video_tokens", [64, 1], ids=["share-of-budget", "floor"])
def test_qwen2vl_frames_equal_hf_with_the_pixel_cap(max_video_tokens):
    """cap_pixels_per_frame with a small max_video_tokens shrinks the frames exactly as transformers does."""
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 768}
    frames = random_frames(8, 300, 200, seed=max_video_tokens)
    capped = _qwen2vl_equal_to_hf(dict(size=size, cap_pixels_per_frame=True, max_video_tokens=max_video_tokens),
                                  frames)
    uncapped = _qwen2vl_equal_to_hf(dict(size=size, cap_pixels_per_frame=False), frames)
    assert capped[1] * capped[2] < uncapped[1] * uncapped[2]


@pytest.fixture(scope="module")
def tiny_qwen2vl_dir(tmp_path_factory):
    """A tiny Qwen2-VL saved as the zoo saves the shipped one (model, tokenizer + chat template, processor files)."""
    _torchvision_or_skip()
    from tokenmem.zoo import video_model

    spec = video_model.Spec(arch="qwen2vl", frames=16, vision_hidden=32, vision_layers=1, lm="tiny")
    tok = video_model.build_tokenizer("qwen2vl")
    path = tmp_path_factory.mktemp("qwen2vl")
    video_model.save_pretrained(video_model.build_model(spec, tok, 0), tok, spec, path)
    return path, spec


def test_qwen2vl_prompt_ids_equal_hf_processor(tiny_qwen2vl_dir):
    """Two task clips and questions of different lengths: Qwen2VLVideoQA.encode gives Qwen2VLProcessor's ids, mask
    (left padding), patches, grid, modality types and video token count."""
    from transformers import Qwen2VLProcessor

    from tokenmem.adapters.qwen2vl import Qwen2VLVideoQA
    from tokenmem.zoo.video_task import clips

    path, spec = tiny_qwen2vl_dir
    processor = Qwen2VLProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    qa = Qwen2VLVideoQA(path, "full", frames=16)
    videos = [c.frames for c in clips("heldout", 2, num_frames=16, size=48)]
    questions = ["What is moving?", "Which colour is the square, and where does it go?"]
    conversations = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}] for q in questions]
    prompts = [processor.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
               for c in conversations]
    assert prompts == [qa.prompt(q) for q in questions]
    theirs = processor(text=prompts, videos=videos, padding=True, return_tensors="pt")
    ours = qa.encode([qa.load(v) for v in videos], questions)
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"])
    assert ours.pixel_values_videos.dtype == theirs["pixel_values_videos"].dtype
    assert torch.equal(ours.pixel_values_videos, theirs["pixel_values_videos"])
    assert torch.equal(ours.extra["video_grid_thw"], theirs["video_grid_thw"])
    assert torch.equal(ours.extra["mm_token_type_ids"], theirs["mm_token_type_ids"])
    video_tokens = (theirs["input_ids"] == qa.video_token_id).sum(-1).tolist()
    assert video_tokens == [spec.video_tokens] * 2 == [8 * 9] * 2
