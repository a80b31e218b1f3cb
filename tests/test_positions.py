"""Position modes: 'shift' re-rotates kept keys to their cache slots, 'original' keeps absolute positions."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tokenmem
from tokenmem import cache_kwargs
from conftest import tiny_model


def capture_raw_keys(model):
    """Record layer 0's keys before RoPE (k_proj outputs), as [heads, tokens, d] in stream order."""
    attn = model.model.layers[0].self_attn
    chunks = []

    def hook(_m, _inp, out):
        b, t, _ = out.shape
        chunks.append(out.view(b, t, -1, attn.head_dim).transpose(1, 2)[0].detach().clone())

    attn.k_proj.register_forward_hook(hook)
    return lambda: torch.cat(chunks, dim=1)


def rotate_to(model, raw, positions):
    """HF's own RoPE: rotate raw keys [h, n, d] to ``positions`` [n]."""
    cos, sin = model.model.rotary_emb(raw, positions[None])
    _, rotated = apply_rotary_pos_emb(raw[None], raw[None], cos, sin)
    return rotated[0]


@pytest.mark.parametrize("mode", ["shift", "original"])
def test_keys_after_eviction(mode):
    model = tiny_model("llama")
    raw_keys = capture_raw_keys(model)
    memory = tokenmem.TokenMemory(model, "sink", budget=40, interval=8, positions=mode)
    ids = torch.randint(3, 300, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, **cache_kwargs(model, memory), use_cache=True)
        for _ in range(20):
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, memory), use_cache=True)
    layer = memory.layers[0]
    assert layer.evictions > 1
    raw = raw_keys()  # [h, seen, d]
    kept = layer.meta.position[0]  # [h, n]
    n = layer.held
    for head in range(kept.shape[0]):
        pos = kept[head]
        target = torch.arange(n) if mode == "shift" else pos
        expected = rotate_to(model, raw[head : head + 1, pos], target)[0]
        torch.testing.assert_close(layer.keys[0, head], expected, rtol=1e-5, atol=1e-5)
    # the next token goes to slot position n (shift) or keeps its absolute position (original)
    before_seen, before_held = memory.seen, layer.held
    with torch.no_grad():
        model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, memory), use_cache=True)
    if layer.held == before_held + 1:  # no eviction on this step
        newest = layer.keys[0, :, -1]
        position = before_held if mode == "shift" else before_seen
        expected = rotate_to(model, raw_keys()[:, -1:], torch.tensor([position]))[:, 0]
        torch.testing.assert_close(newest, expected, rtol=1e-5, atol=1e-5)
        assert int(layer.meta.rope[0, 0, -1]) == position
    else:
        pytest.fail("expected the probe step to append without evicting")


def test_shift_is_ignored_without_rope():
    model = tiny_model("gpt2")
    memory = tokenmem.TokenMemory(model, "sink", budget=16, interval=4, positions="shift")
    ids = torch.randint(3, 300, (1, 40))
    with torch.no_grad():
        model.generate(ids, **cache_kwargs(model, memory), max_new_tokens=8, do_sample=False)
    assert memory.stats()["held"][0] <= 16 + 4
