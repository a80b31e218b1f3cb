"""The adapter base carries a multimodal-RoPE model: a tiny random Qwen2-VL (text + an image + a video, M-RoPE
position ids ``[3, b, q]``) through :mod:`tokenmem.adapters.base` gives plain transformers' generation exactly,
from the whole prompt at once and after a chunked prefill, with no eviction."""

from __future__ import annotations

import copy

import pytest
import torch

import tokenmem
from tokenmem.adapters.base import Prompt, generate, prompt_meta

IMAGE, VIDEO, START, END = 300, 301, 302, 303
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def qwen2vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         bos_token_id=1, eos_token_id=None, pad_token_id=0),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # random weights are small: scale up so that greedy decoding is not tie-prone
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(0)
    text = [torch.randint(3, 290, (n,), generator=g) for n in (7, 9, 5)]
    # an image of 4 x 4 patches (4 tokens after the 2 x 2 merge), a video of 2 x 4 x 4 patches (8 tokens)
    ids = torch.cat([text[0], torch.tensor([START] + [IMAGE] * 4 + [END]), text[1],
                     torch.tensor([START] + [VIDEO] * 8 + [END]), text[2]])[None]
    types = torch.zeros_like(ids, dtype=torch.int)
    types[ids == IMAGE], types[ids == VIDEO] = 1, 2
    inputs = dict(pixel_values=torch.randn(16, 96, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]]),
                  pixel_values_videos=torch.randn(32, 96, generator=g), video_grid_thw=torch.tensor([[2, 4, 4]]),
                  mm_token_type_ids=types)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True, **inputs)
    return model, ids, mask, inputs, reference


@torch.no_grad()
def qwen2vl_prompt(model, ids, mask, inputs) -> Prompt:
    """What a Qwen2-VL modality adds to the base: M-RoPE positions ``[3, b, q]``, the image and video features
    placed in the embeddings, the metadata (media tokens grouped 4 per segment) and the inputs of generate."""
    positions, deltas = model.model.get_rope_index(ids, image_grid_thw=inputs["image_grid_thw"],
                                                   video_grid_thw=inputs["video_grid_thw"], attention_mask=mask,
                                                   mm_token_type_ids=inputs["mm_token_type_ids"])
    model.model.rope_deltas = deltas  # what Qwen2-VL's forward records when it computes the positions itself
    embeds = model.get_input_embeddings()(ids)
    for token, features in ((IMAGE, model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])),
                            (VIDEO, model.model.get_video_features(inputs["pixel_values_videos"],
                                                                   inputs["video_grid_thw"]))):
        features = torch.cat(features.pooler_output)
        embeds = embeds.masked_scatter((ids == token)[..., None].expand_as(embeds), features.to(embeds.dtype))
    media = (ids == IMAGE) | (ids == VIDEO)
    return Prompt(ids, mask, meta=prompt_meta(ids, mask, [], media=media, tokens_per_segment=4),
                  position_ids=positions, inputs_embeds=embeds, model_inputs=inputs)


@pytest.mark.parametrize("chunk", [None, 5], ids=["whole-prompt", "prefill-chunks-of-5"])
def test_qwen2vl_through_the_adapter_base_equals_plain_generate(qwen2vl, chunk):
    model, ids, mask, inputs, reference = qwen2vl
    ours = copy.deepcopy(model)
    memory = tokenmem.TokenMemory(ours.get_decoder(), "full")  # the language model; the vision tower keeps sdpa
    prompt = qwen2vl_prompt(ours, ids, mask, inputs)
    assert prompt.position_ids.shape == (3, 1, ids.shape[1])
    out = generate(ours, memory, prompt, prefill_chunk=chunk, max_new_tokens=NEW_TOKENS, do_sample=False,
                   output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference.sequences)
    for step, (a, b) in enumerate(zip(reference.logits, out.logits)):
        err = (a - b).abs().max().item()
        assert err <= 1e-5, f"step {step}: logits differ by {err}"
    assert memory.stats()["evictions"] == 0 and memory.seen == ids.shape[1] + NEW_TOKENS - 1
    meta = memory.layers[0].meta  # the stored rotary position is M-RoPE's temporal row
    assert torch.equal(meta.rope[0, 0, : ids.shape[1]], prompt.position_ids[0, 0])
    frames = meta.segment[0, 0][meta.modality_is("frame")[0, 0]]
    assert frames.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # the image, then the video's two 4-token frames


def test_shift_positions_are_refused_for_mrope(qwen2vl):
    model = copy.deepcopy(qwen2vl[0])
    assert tokenmem.prepare_model(model.get_decoder()).mrope
    with pytest.raises(tokenmem.TokenmemError, match="multimodal RoPE"):
        tokenmem.TokenMemory(model.get_decoder(), "sink", budget=16, positions="shift")
