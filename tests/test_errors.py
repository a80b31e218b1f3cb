"""Bad input gets a tokenmem error that names the problem and the fix, before any work is lost."""

import pytest
import torch

import tokenmem
from tokenmem import cache_kwargs
from conftest import tiny_model
from video_support import tiny_llava_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("budget", [0, -5, 0.0, -0.5, 1.5, float("nan"), "256", True])
def test_bad_budget(model, budget):
    with pytest.raises(tokenmem.BudgetError, match="budget"):
        tokenmem.TokenMemory(model, "sink", budget=budget)


def test_evicting_without_budget(model):
    with pytest.raises(tokenmem.BudgetError, match="needs a budget"):
        tokenmem.TokenMemory(model, "h2o")


def test_budget_smaller_than_protected_tokens_at_construction(model):
    with pytest.raises(tokenmem.BudgetError, match="sink tokens"):
        tokenmem.TokenMemory(model, "sink", budget=4)
    with pytest.raises(tokenmem.BudgetError, match="initial"):
        tokenmem.TokenMemory(model, "separator", budget=3, separator_ids=[5])


def test_budget_smaller_than_protected_tokens_at_eviction(model):
    """An int budget below what the evictor protects at eviction time is an error (the cache is left intact); a
    fraction of a short stream never goes below the protected tokens (a stream starts small: a DT's first step)."""
    from tokenmem.meta import PROTECT, TokenMeta

    memory = tokenmem.TokenMemory(model, "recent", budget=8, interval=1)
    flags = torch.zeros(1, 20, dtype=torch.long)
    flags[:, :12] = PROTECT  # an adapter protects 12 tokens (a long question), more than the budget
    memory.annotate(TokenMeta.build(1, 20, flags=flags))
    with torch.no_grad(), pytest.raises(tokenmem.BudgetError, match="smaller than the 12 tokens"):
        model(torch.randint(3, 300, (1, 20)), **cache_kwargs(model, memory), use_cache=True)
    assert memory.layers[0].held == 20
    fraction = tokenmem.TokenMemory(model, "sink", budget=0.02, interval=1)
    with torch.no_grad():
        model(torch.randint(3, 300, (1, 100)), **cache_kwargs(model, fraction), use_cache=True)
    assert all(layer.held == 4 for layer in fraction.layers)  # 2% of 100 is 2: the 4 sink tokens stay


def test_unknown_evictor_lists_known_ones(model):
    with pytest.raises(tokenmem.UnknownEvictorError) as info:
        tokenmem.TokenMemory(model, "lru", budget=10)
    for name in ("sink", "h2o", "separator", "recent", "full", "random"):
        assert name in str(info.value)


def test_model_whose_attention_cannot_be_registered():
    """GPT-Neo computes attention in its own code, outside transformers' AttentionInterface."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                       attention_types=[[["global", "local"], 1]], max_position_embeddings=128)
    neo = GPTNeoForCausalLM(cfg)
    with pytest.raises(tokenmem.UnsupportedModelError, match="AttentionInterface"):
        tokenmem.TokenMemory(neo, "sink", budget=32)


def test_not_a_transformers_model():
    with pytest.raises(tokenmem.UnsupportedModelError, match="PreTrainedModel"):
        tokenmem.TokenMemory(torch.nn.Linear(2, 2), "full")


def test_reuse_for_another_batch_size(model):
    memory = tokenmem.TokenMemory(model, "sink", budget=32)
    with torch.no_grad():
        model(torch.randint(3, 300, (2, 10)), **cache_kwargs(model, memory), use_cache=True)
        with pytest.raises(tokenmem.MemoryStateError, match="new TokenMemory"):
            model(torch.randint(3, 300, (3, 10)), **cache_kwargs(model, memory), use_cache=True)
    memory.reset()
    with torch.no_grad():
        model(torch.randint(3, 300, (3, 10)), **cache_kwargs(model, memory), use_cache=True)
    assert memory.seen == 10


def test_attention_switched_away_is_detected(model):
    from conftest import twin

    m = twin(model)
    memory = tokenmem.TokenMemory(m, "sink", budget=32)
    m.set_attn_implementation("sdpa")
    with torch.no_grad(), pytest.raises(tokenmem.TokenmemError, match="not 'tokenmem'"):
        m(torch.randint(3, 300, (1, 10)), **cache_kwargs(m, memory), use_cache=True)


@pytest.mark.parametrize("kwargs,match", [
    ({"interval": 0}, "interval"),
    ({"positions": "absolute"}, "positions"),
    ({"evictor": 3}, "evictor"),
])
def test_other_bad_arguments(model, kwargs, match):
    args = {"evictor": "sink", "budget": 32, **kwargs}
    with pytest.raises(tokenmem.TokenmemError, match=match):
        tokenmem.TokenMemory(model, **args)


def test_separator_evictor_without_separators():
    from transformers import LlamaForCausalLM

    m = tiny_model("llama")
    assert isinstance(m, LlamaForCausalLM)
    with pytest.raises(tokenmem.TokenmemError, match="separator tokens"):
        tokenmem.TokenMemory(m, "separator", budget=64)


# -- bad input reaching a memory: refused before anything is stored ---------------------------------------------
def _logits(model, memory, ids=None, **inputs):
    with torch.no_grad():
        if ids is not None:
            inputs["input_ids"] = ids
        return model(**inputs, **cache_kwargs(model, memory), use_cache=True).logits


def _snapshot(memory):
    return [(layer.seen, layer.held, layer.keys.clone(), layer.values.clone(), layer.packed_meta.clone())
            for layer in memory.layers]


def _same_state(memory, snapshot):
    return all(layer.seen == s and layer.held == h and torch.equal(layer.keys, k) and torch.equal(layer.values, v)
               and torch.equal(layer.packed_meta, m) for layer, (s, h, k, v, m) in zip(memory.layers, snapshot))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("evictor", ["full", "h2o"])
def test_nan_or_inf_inputs_are_refused_and_the_memory_stays_usable(model, value, evictor):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (1, 30), generator=g)
    embeds = model.get_input_embeddings()(ids).detach()
    budget = None if evictor == "full" else 16
    memory = tokenmem.TokenMemory(model, evictor, budget=budget, interval=4)
    clean = tokenmem.TokenMemory(model, evictor, budget=budget, interval=4)
    for m in (memory, clean):
        _logits(model, m, inputs_embeds=embeds[:, :20])
    before = _snapshot(memory)
    bad = embeds[:, 20:25].clone()
    bad[0, 2, 5] = value
    with pytest.raises(tokenmem.errors.InputError, match="layer 0 received keys and values with NaN or inf") as info:
        _logits(model, memory, inputs_embeds=bad)
    assert "stored nothing" in str(info.value)
    assert _same_state(memory, before)  # nothing of the bad call was kept, nothing evicted
    # the stream goes on as if the bad call had never been made
    assert torch.equal(_logits(model, memory, inputs_embeds=embeds[:, 20:]), _logits(model, clean, inputs_embeds=embeds[:, 20:]))


def test_nan_at_a_later_layer_asks_for_a_reset(model):
    """Finite inputs whose keys turn NaN at layer 1 (bad weights): layer 0 has stored the call already, so the
    error says so, and the next call is refused until the memory is reset."""
    from conftest import twin

    m = twin(model)
    memory = tokenmem.TokenMemory(m, "sink", budget=32)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    _logits(m, memory, ids[:, :6])
    hook = m.model.layers[1].self_attn.k_proj.register_forward_hook(lambda mod, args, out: out * float("nan"))
    with pytest.raises(tokenmem.errors.InputError, match="layer 1 received keys .*layers 0-0 stored this call already"):
        _logits(m, memory, ids[:, 6:])
    hook.remove()
    with pytest.raises(tokenmem.MemoryStateError, match="stopped part-way.*memory.reset()"):
        _logits(m, memory, ids[:, 6:])
    assert [layer.seen for layer in memory.layers] == [12, 6]  # the refused call stored nothing
    memory.reset()
    fresh = tokenmem.TokenMemory(m, "sink", budget=32)
    assert torch.equal(_logits(m, memory, ids), _logits(m, fresh, ids))


def test_an_interrupted_call_is_caught_at_the_next_one(model):
    """An error raised inside the model part-way through a forward call (here: at layer 1's attention) leaves layer
    0 a call ahead; the next call says so instead of attending over a stream the layers disagree on."""
    from conftest import twin

    m = twin(model)
    memory = tokenmem.TokenMemory(m, "sink", budget=32)

    def boom(module, args):
        raise KeyboardInterrupt

    hook = m.model.layers[1].self_attn.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        _logits(m, memory, torch.randint(3, 300, (1, 8)))
    hook.remove()
    with pytest.raises(tokenmem.MemoryStateError, match="layer 0 has seen 8 tokens but layer 1 has seen 0"):
        _logits(m, memory, torch.randint(3, 300, (1, 8)))


def test_batch_size_changing_mid_stream_keeps_the_memory(model):
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    memory = tokenmem.TokenMemory(model, "h2o", budget=10, interval=2)
    clean = tokenmem.TokenMemory(model, "h2o", budget=10, interval=2)
    for m in (memory, clean):
        _logits(model, m, ids[:, :12])
    before = _snapshot(memory)
    for wrong in (ids[:1, 12:], torch.cat([ids, ids])[:, 12:]):  # a row dropped, rows added
        with pytest.raises(tokenmem.MemoryStateError, match=r"holds 2 sequence\(s\).*Create a new TokenMemory"):
            _logits(model, memory, wrong)
        assert _same_state(memory, before)
    assert torch.equal(_logits(model, memory, ids[:, 12:]), _logits(model, clean, ids[:, 12:]))


def test_memory_used_after_restore_model(model):
    """A memory outlives the preparation of its model: after restore_model it refuses to run (also once the model
    is prepared again, when its hooks would no longer feed it token ids); a new memory works."""
    from conftest import twin

    m = twin(model)
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(3))
    memory = tokenmem.TokenMemory(m, "separator", budget=32, separator_ids=[5, 7])
    _logits(m, memory, ids)
    tokenmem.restore_model(m)
    assert m.config._attn_implementation == "sdpa"
    with pytest.raises(tokenmem.TokenmemError, match="restore_model.*create a new TokenMemory"):
        _logits(m, memory, ids[:, :2])
    tokenmem.prepare_model(m)
    with pytest.raises(tokenmem.TokenmemError, match="restore_model.*create a new TokenMemory"):
        _logits(m, memory, ids[:, :2])
    assert memory.seen == 10
    again = tokenmem.TokenMemory(m, "separator", budget=32, separator_ids=[5, 7])
    _logits(m, again, ids)
    assert again.layers[0].meta.token[0, 0].tolist() == ids[0].tolist()  # token ids reach the new memory


def test_empty_prompt_is_refused(model, tiny_llama_dir):
    from tokenmem.adapters import Prompt, TextAdapter
    from tokenmem.adapters.base import generate

    memory = tokenmem.TokenMemory(model, "sink", budget=32)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(tokenmem.errors.InputError, match=r"without tokens \(input ids of shape \(1, 0\)\)"):
        _logits(model, memory, empty)
    with pytest.raises(tokenmem.errors.InputError, match="without tokens"), torch.no_grad():
        model.generate(empty, **cache_kwargs(model, memory), max_new_tokens=2)
    with pytest.raises(tokenmem.errors.InputError, match="the prompt has no tokens"):
        generate(model, memory, Prompt(empty, empty.clone()), max_new_tokens=2)
    with pytest.raises(tokenmem.errors.InputError, match="without tokens"):  # a memory driven by hand
        tokenmem.TokenMemory(None, "full").update(torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16), 0)
    assert memory.seen == 0
    with pytest.raises(tokenmem.TokenmemError, match="non-empty"):
        TextAdapter.from_pretrained(tiny_llama_dir).generate([], max_new_tokens=2)


@pytest.mark.parametrize("budget", [False, 2.0, float("inf"), 1e9, -0.0, [256], torch.tensor(64)])
def test_more_bad_budgets(model, budget):
    with pytest.raises(tokenmem.BudgetError, match="budget") as info:
        tokenmem.TokenMemory(model, "sink", budget=budget)
    assert "e.g. budget=256" in str(info.value)


def test_budget_from_numpy_is_an_int_budget(model):
    import numpy as np

    memory = tokenmem.TokenMemory(model, "sink", budget=np.int64(64))
    assert memory.budget == 64 and type(memory.budget) is int
    assert tokenmem.TokenMemory(model, "sink", budget=np.float32(0.5)).budget == 0.5


@pytest.mark.parametrize("name", ["Sink", "h20", "", "sink "])
def test_wrong_evictor_names(model, name):
    with pytest.raises(tokenmem.UnknownEvictorError, match=f"unknown evictor {name!r}.*registered evictors: .*sink"):
        tokenmem.TokenMemory(model, name, budget=64)


# -- videos without frames, and with one ---------------------------------------------------------------------
def test_empty_video_is_refused_and_a_single_frame_works(tiny_llava_dir, tmp_path):  # noqa: F811
    import numpy as np
    from transformers import LlavaNextVideoForConditionalGeneration

    from tokenmem.adapters import VideoError, VideoQA
    from tokenmem.adapters.video_io import Clip, read_video, write_video
    from video_fixtures import moving_shapes

    qa = VideoQA(tiny_llava_dir, "h2o", budget=24, interval=4, frames=1)
    frames = moving_shapes(4, 16, 16)
    with pytest.raises(tokenmem.errors.InputError, match="the video has no frames"):
        qa.ask(frames[:0], "What is moving?")
    no_frames = Clip(frames=frames[:0], timestamps=np.zeros(0), indices=np.zeros(0, dtype=int), fps=1.0, total_frames=0)
    with pytest.raises(tokenmem.errors.InputError, match="the video has no frames"):
        qa.ask(no_frames, "What is moving?")
    with pytest.raises(tokenmem.TokenmemError, match="without frames"):
        write_video(tmp_path / "empty.mp4", frames[:0])
    with pytest.raises(VideoError, match="is a directory, not a video file"):
        qa.ask(str(tmp_path), "What is moving?")
    with pytest.raises(VideoError, match="has only 1 frames.*use at most 1 frames"):
        VideoQA(tiny_llava_dir, frames=2).ask(write_video(tmp_path / "one.mp4", frames[:1]), "What is moving?")
    # one frame, from an array and from a file: answered within the budget, the report covers one frame
    for video in (frames[:1], str(tmp_path / "one.mp4")):
        answer = qa.ask(video, "What is moving?", max_new_tokens=3)
        assert answer.tokens.shape == (3,) and answer.report.frames == 1
        assert answer.memory.stats()["evictions"] > 0 and max(answer.memory.stats()["held"]) <= 24 + 4 - 1
    # and with the full cache, the tokens of plain generate
    full = VideoQA(tiny_llava_dir, frames=1)
    answer = full.ask(str(tmp_path / "one.mp4"), "What is moving?", max_new_tokens=4)
    inputs = full.encode([read_video(tmp_path / "one.mp4", 1)], ["What is moving?"])
    with torch.no_grad():
        plain = LlavaNextVideoForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval().generate(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
            pixel_values_videos=inputs.pixel_values_videos, max_new_tokens=4, do_sample=False,
            pad_token_id=full.tokenizer.pad_token_id)
    assert torch.equal(answer.tokens, plain[0, inputs.input_ids.shape[1]:])
