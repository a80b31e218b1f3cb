"""Segment-granularity eviction (``TokenMemory(evict_unit="segment")``): whole frames / timesteps stay or go.

The memory's choice is compared with a plain-Python reference of the rule (units = segments of non-text
tokens, or single tokens; mean score; protected units first; then by score, newest first on ties; fill the
budget by whole units until the first that does not fit)."""

import pytest
import torch

import tokenmem
from tokenmem import cache_kwargs
from conftest import tiny_model, twin
from tokenmem.meta import MODALITIES, PROTECT, TokenMeta

TEXT, FRAME = MODALITIES["text"], MODALITIES["frame"]


class Recorded(tokenmem.Evictor):
    """Scores = the first key channel (differs per row and head); remembers what it scored."""

    name = "recorded"

    def __init__(self, threshold=None):
        self.threshold = threshold
        self.seen = []

    def score(self, view):
        scores = view.keys[..., 0].float()
        self.seen.append((view.layer, view.meta.position.clone(), view.meta.segment.clone(),
                          view.meta.modality.clone(), view.meta.flags.clone(), scores.clone()))
        return scores


def layout(batch=2, head_text=6, frames=8, per_frame=5, tail_text=4, protect_tail=True):
    """Text, then ``frames`` segments of ``per_frame`` frame tokens, then (protected) text: ``[b, q]`` meta."""
    q = head_text + frames * per_frame + tail_text
    modality = torch.full((q,), TEXT)
    segment = torch.full((q,), -1)
    flags = torch.zeros(q, dtype=torch.long)
    block = slice(head_text, head_text + frames * per_frame)
    modality[block] = FRAME
    segment[block] = torch.arange(frames).repeat_interleave(per_frame)
    if protect_tail:
        flags[-tail_text:] = PROTECT
    return TokenMeta.build(batch, q, modality=modality, segment=segment, flags=flags)


def reference_kept(positions, segments, modalities, flags, scores, budget, threshold=None):
    """The positions the rule keeps for one (row, head); plain Python."""
    units = {}
    for p, s, m, f, sc in zip(positions, segments, modalities, flags, scores):
        key = ("segment", s) if (m != TEXT and s >= 0) else ("token", p)
        units.setdefault(key, []).append((p, f, sc))
    ranked = []
    for members in units.values():
        protected = any(f & PROTECT for _, f, _ in members)
        mean = sum(sc for _, _, sc in members) / len(members)
        newest = max(p for p, _, _ in members)
        ranked.append((not protected, -mean, -newest, protected, mean, [p for p, _, _ in members]))
    ranked.sort()
    kept, total = [], 0
    for _, _, _, protected, mean, members in ranked:
        if total + len(members) > budget or (threshold is not None and not protected and mean < threshold):
            break
        kept += members
        total += len(members)
    return sorted(kept)


def held_positions(layer, b, h):
    meta = layer.meta
    valid = meta.valid[b, h]
    return meta.position[b, h][valid].tolist()


@pytest.mark.parametrize("budget", [24, 31])
def test_whole_segments_kept_or_dropped_as_the_rule_says(budget):
    model = tiny_model("llama")
    evictor = Recorded()
    memory = tokenmem.TokenMemory(model, evictor, budget=budget, evict_unit="segment")
    meta = layout()
    ids = torch.randint(3, 300, tuple(meta.position.shape), generator=torch.Generator().manual_seed(3))
    memory.annotate(meta)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, memory), use_cache=True)
    assert len(evictor.seen) == len(memory.layers)  # one eviction per layer at the end of the prefill
    some_frame_dropped = some_frame_kept = False
    for layer_idx, pos, seg, mod, flags, scores in evictor.seen:
        layer = memory.layers[layer_idx]
        for b in range(pos.shape[0]):
            for h in range(pos.shape[1]):
                want = reference_kept(pos[b, h].tolist(), seg[b, h].tolist(), mod[b, h].tolist(),
                                      flags[b, h].tolist(), scores[b, h].tolist(), budget)
                got = held_positions(layer, b, h)
                assert got == want, (layer_idx, b, h)
                assert len(got) <= budget
                # every frame is all in or all out, and the protected question is in
                kept_meta = layer.meta
                valid = kept_meta.valid[b, h]
                frames = kept_meta.segment[b, h][valid & (kept_meta.modality[b, h] == FRAME)]
                counts = torch.bincount(frames, minlength=8)
                assert set(counts.tolist()) <= {0, 5}
                some_frame_dropped |= bool((counts == 0).any())
                some_frame_kept |= bool((counts == 5).any())
                assert set(range(50 - 4, 50)) <= set(got)
        assert max(memory.stats()["held"]) <= budget
    assert some_frame_dropped and some_frame_kept


def test_threshold_evictor_keeps_segments_whose_mean_passes():
    model = tiny_model("llama")
    evictor = Recorded(threshold=0.0)
    memory = tokenmem.TokenMemory(model, evictor, budget=40, evict_unit="segment")
    meta = layout(protect_tail=False)
    ids = torch.randint(3, 300, tuple(meta.position.shape), generator=torch.Generator().manual_seed(4))
    memory.annotate(meta)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, memory), use_cache=True)
    for layer_idx, pos, seg, mod, flags, scores in evictor.seen:
        for b in range(pos.shape[0]):
            for h in range(pos.shape[1]):
                want = reference_kept(pos[b, h].tolist(), seg[b, h].tolist(), mod[b, h].tolist(),
                                      flags[b, h].tolist(), scores[b, h].tolist(), 40, threshold=0.0)
                assert held_positions(memory.layers[layer_idx], b, h) == want


def test_non_binding_budget_changes_nothing():
    """A budget above the sequence: segment eviction gives the same tokens as plain generate."""
    model = tiny_model("llama")
    reference = twin(model)
    meta = layout(batch=2)
    ids = torch.randint(3, 300, tuple(meta.position.shape), generator=torch.Generator().manual_seed(5))
    memory = tokenmem.TokenMemory(model, "h2o", budget=400, interval=4, evict_unit="segment")
    memory.annotate(meta)
    with torch.no_grad():
        ours = model.generate(ids, **cache_kwargs(model, memory), max_new_tokens=12, do_sample=False)
        plain = reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, plain)
    assert memory.stats()["held"] == [ids.shape[1] + 11] * len(memory.layers)


def test_binding_budget_with_generate_keeps_whole_frames_through_decoding():
    model = tiny_model("llama")
    meta = layout(batch=1)
    ids = torch.randint(3, 300, tuple(meta.position.shape), generator=torch.Generator().manual_seed(6))
    memory = tokenmem.TokenMemory(model, "h2o", budget=30, interval=4, evict_unit="segment")
    memory.annotate(meta)
    with torch.no_grad():
        model.generate(ids, **cache_kwargs(model, memory), max_new_tokens=20, do_sample=False)
    for layer in memory.layers:
        m = layer.meta
        frame = m.valid & (m.modality == FRAME)
        for b in range(frame.shape[0]):
            for h in range(frame.shape[1]):
                counts = torch.bincount(m.segment[b, h][frame[b, h]], minlength=8)
                assert set(counts.tolist()) <= {0, 5}
        assert layer.held <= 30 + 4


def test_bad_evict_unit_is_reported():
    with pytest.raises(tokenmem.TokenmemError, match="evict_unit must be one of"):
        tokenmem.TokenMemory(None, "sink", budget=8, evict_unit="frame")
