"""NAMM: features vs a float64 torch.stft reference, blocked BAM vs dense, the keep rule, scorer files."""

import json

import pytest
import torch

import tokenmem
from tokenmem import cache_kwargs
from conftest import Chooser, padded_batch, tiny_model, twin
from tokenmem.plugins.namm import NAMM, NAMMConfig
from tokenmem.plugins.namm.features import update_ema
from tokenmem.plugins.namm.scorer import bam_scores, bam_scores_dense, initial_params, num_params, unflatten


def stft_reference(signal, cfg, created):
    """float64: |STFT| of the whole zero-padded signal [n, T] and the EMA over all its frames."""
    pad = cfg.n_fft - cfg.hop
    padded = torch.cat([torch.zeros(signal.shape[0], pad, dtype=torch.float64), signal.double()], dim=1)
    spec = torch.stft(padded, n_fft=cfg.n_fft, hop_length=cfg.hop, window=torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float64),
                      center=False, return_complex=True).abs()  # [n, bins, frames]
    frames = spec.shape[-1]
    g = torch.arange(frames)
    ends = g * cfg.hop + cfg.n_fft
    weights = (cfg.ema ** cfg.hop) ** (frames - 1 - g).double()
    valid = ends[None, :] > (created[:, None] + pad)  # frame ends after the token's first sample
    return (spec * (weights * valid)[:, None, :]).sum(-1)  # [n, bins]


def test_spectrogram_ema_three_updates_match_float64_stft():
    cfg = NAMMConfig(interval=64)
    t, n, updates = 64, 40, 3
    g = torch.Generator().manual_seed(0)
    created = torch.randint(0, updates * t, (n,), generator=g)
    created[:10] = 0  # some tokens exist from the start
    signal = torch.rand(n, updates * t, generator=g) + 0.01  # attention values, never zero
    signal[torch.arange(updates * t)[None, :] < created[:, None]] = 0.0  # a token gets no attention before it exists
    ema = torch.zeros(1, 1, n, cfg.bins)
    tail = torch.zeros(1, 1, n, cfg.tail)
    for u in range(updates):
        rows = signal[:, u * t : (u + 1) * t].T[None, None].float()  # [1, 1, t, n]
        first = (created - u * t).clamp(min=0)[None, None]
        ema, tail = update_ema(ema, tail, rows, first, cfg)
        # tokens created after this update have no state yet: they appear at the next one
        ema[0, 0, created >= (u + 1) * t] = 0.0
        tail[0, 0, created >= (u + 1) * t] = 0.0
    expected = stft_reference(signal, cfg, created)
    err = ((ema[0, 0].double() - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-6, err


@pytest.mark.parametrize("n", [1, 7, 63, 65, 300])
def test_blocked_bam_equals_dense(n):
    cfg = NAMMConfig()
    g = torch.Generator().manual_seed(n)
    params = unflatten(torch.randn(num_params(cfg), generator=g) * 0.3, cfg)
    x = torch.randn(3, n, cfg.features, generator=g)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[1, : n // 3] = False  # left padding
    valid[2, torch.randperm(n, generator=g)[: n // 4]] = False  # holes (masked tokens)
    ours = bam_scores(x, valid, params, block=16)
    ref = bam_scores_dense(x, valid, params)
    live = valid
    assert ((ours.double() - ref)[live].abs().max() / ref[live].abs().max()).item() < 1e-5
    assert num_params(cfg) == 4172


@pytest.mark.parametrize("key_diff", [False, True])  # True: the v3 search's initial scorer, 2 + KeyDiff's score
def test_nonnegative_scorer_keeps_everything_and_matches_dynamic_cache(key_diff):
    base = tiny_model("llama")
    ids, mask = padded_batch(2, 70, seed=1)
    with torch.no_grad():
        ref = base.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
        model = twin(base)
        memory = tokenmem.TokenMemory(model, NAMM(NAMMConfig(interval=32, key_diff=key_diff)))
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, memory), max_new_tokens=40, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    assert memory.stats()["evictions"] >= 3  # the scorer ran, and kept everything
    assert torch.equal(ref.sequences, out.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ref.logits, out.logits)) < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("key_diff", [False, True])
def test_namm_generates_batch2_left_padded(family, dtype, key_diff):
    model = tiny_model(family).to(dtype)
    cfg = NAMMConfig(interval=32, key_diff=key_diff)
    g = torch.Generator().manual_seed(3)
    params = initial_params(cfg, score=0.0)
    params[-1 - cfg.features : -1] = torch.randn(cfg.features, generator=g)  # a linear scorer on the features
    namm = NAMM(cfg, params)
    memory = tokenmem.TokenMemory(model, namm, budget=48)
    ids, mask = padded_batch(2, 90, seed=2)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, memory), max_new_tokens=40, do_sample=False)
    assert out.shape == (2, 130)
    stats = memory.stats()
    assert stats["evictions"] > 0 and max(stats["held"]) <= 48 + 32
    for layer in memory.layers:
        assert layer.token_state["namm_ema"].dtype == torch.float32
        assert torch.isfinite(layer.token_state["namm_ema"]).all()


def test_ragged_per_head_counts_are_masked():
    model = tiny_model("llama")  # 2 KV heads
    memory = tokenmem.TokenMemory(model, Chooser(), interval=16, record_stats=True)
    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, **cache_kwargs(model, memory), use_cache=True)
        assert memory.layers[0].evictions == 1
        model(torch.tensor([[5]]), **cache_kwargs(model, memory), use_cache=True)  # attends over the ragged cache
    layer = memory.layers[0]
    meta = layer.meta
    for head, rule in ((0, lambda p: p % 2 == 0), (1, lambda p: p % 3 == 0)):
        pos = meta.position[0, head]
        attended = meta.valid[0, head]
        wanted = {p for p in range(48) if rule(p)} | {47, 48}  # + the newest token at eviction, + the new one
        assert set(pos[attended].tolist()) == wanted
        assert torch.all(layer.mass[0, head][~attended] == 0)  # masked slots receive no attention
    assert layer.held == 24 + 1 + 1  # the larger head count (even positions + newest) + the new token


def test_scorer_file_round_trip_and_errors(tmp_path):
    cfg = NAMMConfig(interval=64, hidden=16)
    namm = NAMM(cfg, torch.randn(num_params(cfg)), torch.rand(cfg.bins), torch.rand(cfg.bins) + 0.5)
    namm.save(tmp_path / "s")
    loaded = NAMM.from_file(tmp_path / "s")
    assert loaded.config == cfg
    assert torch.equal(loaded.params, namm.params) and torch.equal(loaded.norm_var, namm.norm_var)
    meta = json.loads((tmp_path / "s" / "scorer.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "s" / "scorer.json").write_text(json.dumps(meta))
    with pytest.raises(tokenmem.TokenmemError, match="format version 99"):
        NAMM.from_file(tmp_path / "s")
    namm.save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "scorer.json").read_text())
    meta["config"]["hidden"] = 32  # the weights were saved for hidden 16
    meta["layout"] = [[n, list(s)] for n, s in __import__("tokenmem.plugins.namm.scorer", fromlist=["layout"]).layout(NAMMConfig(interval=64))]
    (tmp_path / "t" / "scorer.json").write_text(json.dumps(meta))
    with pytest.raises(tokenmem.TokenmemError, match="params has shape"):
        NAMM.from_file(tmp_path / "t")
    namm.save(tmp_path / "u")
    data = (tmp_path / "u" / "scorer.safetensors").read_bytes()
    (tmp_path / "u" / "scorer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(tokenmem.TokenmemError, match="cannot read"):
        NAMM.from_file(tmp_path / "u")
    with pytest.raises(tokenmem.TokenmemError, match="parameter vector"):
        NAMM(cfg, torch.randn(10))


def test_load_takes_a_shipped_name_initial_or_a_path(tmp_path):
    cfg = NAMMConfig(interval=64, hidden=16)
    namm = NAMM(cfg, torch.randn(num_params(cfg)))
    namm.save(tmp_path / "s")
    assert torch.equal(NAMM.load(tmp_path / "s").params, namm.params)
    assert torch.equal(NAMM.load("language").params, NAMM.pretrained("language").params)
    assert torch.equal(NAMM.load("initial").params, NAMM().params)
    assert not torch.equal(NAMM.load("language").params, NAMM().params)
    with pytest.raises(tokenmem.TokenmemError, match="does not exist"):
        NAMM.load(str(tmp_path / "missing"))
    with pytest.raises(tokenmem.TokenmemError, match="no shipped NAMM scorer named 'nope'"):
        NAMM.load("nope")


def test_memory_interval_defaults_to_the_namm_interval():
    model = tiny_model("llama")
    assert tokenmem.TokenMemory(model, NAMM(interval=64)).interval == 64
    assert tokenmem.TokenMemory(model, NAMM(interval=64), interval=32).interval == 32


def test_calibration_freezes_feature_statistics():
    model = tiny_model("llama")
    namm = NAMM(interval=32)
    namm.start_calibration()
    memory = tokenmem.TokenMemory(model, namm)
    with torch.no_grad():
        model(torch.randint(3, 300, (1, 130)), **cache_kwargs(model, memory), use_cache=True)
    namm.freeze()
    assert namm.norm_mean.shape == (17,) and torch.all(namm.norm_var > 0)
    assert not torch.equal(namm.norm_mean, torch.zeros(17))


def test_aligned_ema_update_equals_the_general_one():
    """The memory's fast path (every token older than the queries, rows kept [queries, tokens]) gives the
    general update's EMA and tail, for one hop and for many."""
    from tokenmem.plugins.namm.features import update_ema_aligned

    cfg = NAMMConfig(interval=64)
    g = torch.Generator().manual_seed(5)
    for t, n in ((16, 1), (16, 37), (128, 300), (64, 5)):
        ema, tail = torch.rand(2, 3, n, cfg.bins, generator=g), torch.rand(2, 3, n, cfg.tail, generator=g)
        rows = torch.rand(2, 3, t, n, generator=g)
        first = torch.zeros(2, 3, n, dtype=torch.long)
        ref = update_ema(ema, tail, rows, first, cfg)
        ours = update_ema_aligned(ema, tail, rows, cfg)
        for a, b in zip(ref, ours):
            assert ((a - b).abs().max() / a.abs().max()).item() < 1e-6, (t, n)


@pytest.mark.parametrize("rows_chunk, calls", [(256, (70,)), (0, (70,)), (32, (70,)), (256, (33, 17, 45))])
def test_streamed_ema_in_memory_equals_batch_stft_of_eager_attention(rows_chunk, calls):
    """The whole chain: kernel rows -> memory row window (long calls split into ``rows_chunk`` sub-chunks,
    or into window-sized ones with 0) -> NAMM.observe == float64 torch.stft over each token's eager
    attention column, whatever the call sizes."""
    eager = tiny_model("llama", attn="eager")
    ours = twin(eager)
    cfg = NAMMConfig(interval=64)
    memory = tokenmem.TokenMemory(ours, NAMM(cfg, rows_chunk=rows_chunk))  # initial scorer: keeps everything
    ids = torch.randint(3, 300, (1, 150), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        start = 0
        for size in calls:  # prefill calls
            ours(ids[:, start : start + size], **cache_kwargs(ours, memory), use_cache=True)
            start += size
        for i in range(start, 150):
            ours(ids[:, i : i + 1], **cache_kwargs(ours, memory), use_cache=True)
        attn = eager(ids, output_attentions=True).attentions
    frames_queries = 150 - 150 % cfg.hop
    for layer_idx, weights in enumerate(attn):  # [1, hq, 150, 150]
        cols = weights[0].reshape(2, 2, 150, 150).mean(1)  # [hkv, queries, keys], mean over the group
        layer = memory.layers[layer_idx]
        assert layer.held == 150
        ema = layer.token_state["namm_ema"][0]  # [hkv, n, bins]
        for head in range(2):
            signal = cols[head, :frames_queries, :].T  # [keys, queries]
            expected = stft_reference(signal, cfg, torch.arange(150))
            err = ((ema[head].double() - expected).abs().max() / expected.abs().max()).item()
            assert err < 1e-5, (layer_idx, head, err)


def test_namm_batch_rows_match_their_single_runs():
    """Each row of a left-padded batch keeps the same tokens as its prompt run alone (fp32). The padding
    is a whole number of hops: NAMM's STFT frames are aligned to the stream, so other paddings shift the
    frames of the padded rows (inherent to a batched spectrogram, as in the paper's code)."""
    model = tiny_model("llama")
    cfg = NAMMConfig(interval=32)
    g = torch.Generator().manual_seed(3)
    params = initial_params(cfg, score=0.0)
    params[-1 - cfg.features : -1] = torch.randn(cfg.features, generator=g)
    ids, mask = padded_batch(2, 90, seed=2, pad=cfg.hop)  # row 1 has one hop of padding
    kept_batch = []
    memory = tokenmem.TokenMemory(model, NAMM(cfg, params))
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(model, memory), use_cache=True)
    for layer in memory.layers:
        kept_batch.append(layer.meta)
    assert memory.stats()["evictions"] > 0
    for row, pad in ((0, 0), (1, cfg.hop)):
        alone = tokenmem.TokenMemory(model, NAMM(cfg, params))
        with torch.no_grad():
            model(ids[row : row + 1, pad:], **cache_kwargs(model, alone), use_cache=True)
        for meta_b, layer in zip(kept_batch, alone.layers):
            for head in range(2):
                batch_set = set((meta_b.position[row, head][meta_b.valid[row, head]] - pad).tolist())
                alone_set = set(layer.meta.position[0, head][layer.meta.valid[0, head]].tolist())
                assert batch_set == alone_set, (row, head)


# -- the key feature (NAMMConfig(key_diff=True), the v3 scorer) -------------------------------------------------------
def test_key_feature_is_off_for_the_shipped_v1_v2_configs_and_round_trips(tmp_path):
    from tokenmem.zoo import SCORERS_DIR

    cfg = NAMMConfig(interval=128)
    assert "key_diff" not in cfg.to_dict() and cfg.features == 25  # v1/v2 files and checkpoints are unchanged
    assert not NAMM.pretrained("language-v1").config.key_diff and NAMM.pretrained("language-v1").config.features == 25
    for directory in sorted(p for p in SCORERS_DIR.iterdir() if (p / "scorer.json").exists()):
        shipped = json.loads((directory / "scorer.json").read_text())["config"]
        assert NAMM.from_file(directory).config.to_dict() == shipped, directory.name  # written as it was read
    on = NAMMConfig(interval=128, key_diff=True)
    assert on.to_dict()["key_diff"] is True and on.features == 26
    namm = NAMM(on, initial_params(on) + 0.01)
    namm.save(tmp_path / "s")
    back = NAMM.from_file(tmp_path / "s")
    assert back.config == on and torch.equal(back.params, namm.params)


def test_key_feature_initial_scorer_ranks_tokens_as_keydiff():
    """The v3 search starts from a scorer that is ``2 + KeyDiff's score`` on every token: under a budget it ranks
    tokens as KeyDiff does (checked on every view the memory scores; the kept sets can still differ from the
    ``keydiff`` evictor's, since NAMM protects the newest token and updates every ``interval`` tokens)."""
    from plugins.keydiff import KeyDiffEvictor

    gaps = []

    class Both(NAMM):
        def score(self, view):
            s = super().score(view)
            k = KeyDiffEvictor().score(view)
            gaps.append(float((s - 2.0 - k)[view.meta.valid].abs().max()))
            return s

    cfg = NAMMConfig(interval=16, key_diff=True)
    model = tiny_model("llama")
    ids = torch.randint(3, 300, (2, 96), generator=torch.Generator().manual_seed(0))
    memory = tokenmem.TokenMemory(model, Both(cfg), budget=32)
    with torch.no_grad():
        for s in range(0, 96, 16):
            model(ids[:, s : s + 16], **cache_kwargs(model, memory), use_cache=True)
    assert len(gaps) >= 5 and max(gaps) < 1e-5, gaps
    assert max(memory.stats()["held"]) <= 32 + 15
