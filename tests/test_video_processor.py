"""Our frame preprocessing and placeholder expansion give exactly what ``LlavaNextVideoProcessor`` gives.

The HF video processor needs torchvision, which does not import beside the CPU build of torch 2.13 used by
the main test environment: these tests run in the ``.venv-vision`` environment of ``scripts/test.sh``
(torch 2.14.1 + torchvision 0.29.1) and are skipped elsewhere.
"""

import numpy as np
import pytest
import torch

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
