"""Decision Transformer adapter: cached rollouts vs the official example's loop, batches, eviction, errors, CLI."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from decision_support import ACT_DIM, STATE_DIM, one_thread, save_tiny_dt  # noqa: F401  (fixture)

import tokenmem
from tokenmem.adapters.decision import CachedPolicy, DecisionAdapter, ReferencePolicy
from tokenmem.envs.rollout import rollout
from tokenmem.envs import make_env
from tokenmem.errors import TokenmemError
from tokenmem.meta import MODALITIES

ORDER = [MODALITIES["return"], MODALITIES["state"], MODALITIES["action"]]


@pytest.fixture(scope="module")
def dt_dir(tmp_path_factory):
    return save_tiny_dt(tmp_path_factory.mktemp("dt") / "tiny-dt")


@pytest.fixture
def adapter(dt_dir):
    return DecisionAdapter.from_pretrained(dt_dir)


@pytest.fixture(scope="module")
def plain(dt_dir):
    """A second, never prepared copy: transformers' own DecisionTransformerModel with sdpa."""
    from transformers import DecisionTransformerModel

    return DecisionTransformerModel.from_pretrained(dt_dir).eval()


def hoppers(n, **kwargs):
    return [make_env("Hopper-v5", **kwargs) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_rollout_equals_reference_loop(adapter, plain, seed):
    """No eviction, episodes of at most K steps: the same actions as the official example's loop."""
    K = adapter.context
    ref = rollout(adapter, ReferencePolicy(adapter, model=plain), hoppers(1), [seed], max_steps=K)
    cached = rollout(adapter, CachedPolicy(adapter), hoppers(1), [seed], max_steps=K)
    assert ref.lengths.tolist() == cached.lengths.tolist()
    assert ref.lengths[0] >= 10
    a, b = ref.actions[0], cached.actions[0]
    assert a.std(axis=0).min() > 1e-2  # the actions really depend on the inputs
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    assert ref.returns[0] == pytest.approx(cached.returns[0], abs=1e-4)
    assert cached.memory.seen == 3 * int(cached.lengths[0]) - 1


def test_reference_window_differs_from_full_history(dt_dir, plain):
    """Beyond K steps the reference loop forgets and the full cache does not: equal up to K, different after."""
    adapter = DecisionAdapter.from_pretrained(dt_dir, context=5)
    envs = lambda: hoppers(1, terminate_when_unhealthy=False)  # noqa: E731
    ref = rollout(adapter, ReferencePolicy(adapter, model=plain), envs(), [0], max_steps=15)
    cached = rollout(adapter, CachedPolicy(adapter), envs(), [0], max_steps=15)
    np.testing.assert_allclose(cached.actions[0][:5], ref.actions[0][:5], atol=1e-5)
    assert np.abs(cached.actions[0][5:] - ref.actions[0][5:]).max() > 1e-3


def test_outputs_match_plain_model(adapter, plain):
    """A whole (left-padded) trajectory through the cached path gives DecisionTransformerModel's actions."""
    g = torch.Generator().manual_seed(0)
    b, T = 3, 9
    states, actions = torch.randn(b, T, STATE_DIM, generator=g), torch.randn(b, T, ACT_DIM, generator=g)
    rtg, timesteps = torch.randn(b, T, 1, generator=g), torch.randint(0, 1000, (b, T), generator=g)
    mask = torch.ones(b, T, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        expected = plain(states=states, actions=actions, returns_to_go=rtg, timesteps=timesteps,
                         attention_mask=mask).action_preds
    got = adapter.predict_actions(states, actions, rtg, timesteps, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    assert expected[real].std() > 1e-2


@pytest.mark.parametrize("evictor", ["recent", "h2o"])
def test_vectorised_episodes_equal_single_ones(adapter, evictor):
    """Three episodes as one batch (ending at different steps) act exactly as each one alone."""
    seeds, limits = [0, 1, 2], [40, 17, 29]  # episodes end at their time limits: later steps see padded rows

    def env(limit):
        return make_env("Hopper-v5", terminate_when_unhealthy=False, max_episode_steps=limit)

    batch = rollout(adapter, CachedPolicy(adapter, evictor, budget=30), [env(n) for n in limits], seeds, max_steps=40)
    assert batch.lengths.tolist() == limits
    assert batch.memory.stats()["evictions"] > 0
    for i, seed in enumerate(seeds):
        single = rollout(adapter, CachedPolicy(adapter, evictor, budget=30), [env(limits[i])], [seed], max_steps=40)
        assert single.lengths[0] == limits[i]
        np.testing.assert_allclose(batch.actions[i], single.actions[0], atol=1e-5)


def _check_metadata(memory):
    for layer in memory.layers:
        meta = layer.meta
        # stream order R_0, s_0, a_0, R_1, ...: the position fixes modality and timestep
        assert torch.equal(meta.segment, meta.position // 3)
        assert torch.equal(meta.modality, torch.tensor(ORDER)[meta.position % 3])


@pytest.mark.parametrize("evictor", ["full", "recent", "sink", "h2o", "namm"])
def test_every_evictor_runs_within_budget(adapter, evictor):
    budget = None if evictor == "full" else 30
    options = {"interval": 16} if evictor == "namm" else {}
    envs = hoppers(2, terminate_when_unhealthy=False)
    result = rollout(adapter, CachedPolicy(adapter, evictor, budget, **options), envs, [3, 4], max_steps=40)
    memory = result.memory
    assert result.lengths.tolist() == [40, 40]
    assert memory.seen == 3 * 40 - 1
    held = [layer.held for layer in memory.layers]
    # the adapter's default: a 3-token step is a decode step, evictions every 9 new tokens (NAMM: the 16 given)
    assert memory.decode_span == 3 and memory.interval == (16 if evictor == "namm" else 9)
    if budget is None:
        assert held == [memory.seen] * len(held)
    else:
        assert max(held) <= budget + memory.interval - 1 and memory.stats()["evictions"] > 0
    _check_metadata(memory)


@pytest.mark.parametrize("interval", [12, None])
def test_decode_span_3_batches_rollout_evictions(adapter, interval):
    """By default (decode_span=3) the memory evicts once `interval` tokens have accumulated (fewer evictions, held
    <= budget + interval - 1 after every step; interval 9 unless given); decode_span=1 evicts after every step
    (held <= budget)."""
    seen_held = {}
    for span in (None, 1):
        options = {} if span is None else {"decode_span": span}
        policy = CachedPolicy(adapter, "recent", 30, interval, **options)
        act, held = policy.act, []

        def act_and_check(*a, _act=act, _held=held, _policy=policy, **k):
            out = _act(*a, **k)
            _held.append(max(layer.held for layer in _policy.memory.layers))
            return out

        policy.act = act_and_check
        result = rollout(adapter, policy, hoppers(1, terminate_when_unhealthy=False), [0], max_steps=40)
        seen_held[span] = (held, result.memory.stats()["evictions"])
    (spaced, spaced_evictions), (every, every_evictions) = seen_held[None], seen_held[1]
    spacing = 9 if interval is None else interval
    assert max(every) <= 30 and max(spaced) <= 30 + spacing - 1 and max(spaced) > 30
    assert spaced_evictions < every_evictions


def test_a_memory_config_is_used_as_given(adapter):
    """The adapter's decode_span / interval defaults are not added to a MemoryConfig (TokenMemory refuses settings
    given both ways)."""
    config = tokenmem.MemoryConfig("recent", budget=30, decode_span=1)
    memory = adapter.memory(config=config)
    assert memory.decode_span == 1 and memory.interval == config.interval_for(memory.evictor) and memory.budget == 30
    result = rollout(adapter, CachedPolicy(adapter, config=config), hoppers(1, terminate_when_unhealthy=False), [0],
                     max_steps=20)
    assert max(layer.held for layer in result.memory.layers) <= 30  # decode_span=1: evicts after every step


def test_long_history_beyond_context(adapter):
    """The cache keeps more than K timesteps (here 30 of 60 with a 90-token budget; all 60 without one)."""
    envs = lambda: hoppers(1, terminate_when_unhealthy=False)  # noqa: E731
    full = rollout(adapter, CachedPolicy(adapter), envs(), [0], max_steps=60)
    bounded = rollout(adapter, CachedPolicy(adapter, "recent", budget=90, decode_span=1), envs(), [0], max_steps=60)
    assert full.memory.layers[0].held == 3 * 60 - 1 > 3 * adapter.context
    meta = bounded.memory.layers[0].meta
    assert bounded.memory.layers[0].held == 90
    assert torch.equal(meta.position[0, 0], torch.arange(179 - 90, 179))  # recent: the newest 90 tokens
    assert len(meta.segment.unique()) == 31 > adapter.context  # a_29, then timesteps 30..59


@pytest.mark.skipif("evict_unit" not in inspect.signature(tokenmem.TokenMemory.__init__).parameters,
                    reason="needs TokenMemory(evict_unit='segment') (being added to tokenmem/memory.py)")
@pytest.mark.parametrize("evictor", ["recent", "h2o"])
def test_evict_whole_timesteps(adapter, evictor):
    envs = hoppers(2, terminate_when_unhealthy=False)
    result = rollout(adapter, CachedPolicy(adapter, evictor, budget=31, evict_timesteps=True), envs, [0, 1],
                     max_steps=30)
    assert result.memory.evict_unit == "segment"
    for layer in result.memory.layers:
        meta = layer.meta
        assert int(meta.valid.sum(-1).max()) <= 31 + result.memory.interval - 1 and layer.evictions > 0
        for row in range(2):
            for head in range(meta.segment.shape[1]):
                valid = meta.valid[row, head]
                seg = meta.segment[row, head][valid]
                newest = int(seg.max())
                counts = torch.bincount(seg)
                # every kept timestep is whole: (R, s, a); the newest one has no action yet
                assert all(int(counts[s]) == 3 for s in seg.unique().tolist() if s != newest)
                assert int(counts[newest]) == 2


def test_settings_saved_in_config(dt_dir, tmp_path):
    settings = {"env_id": "Hopper-v5", "context": 7, "return_scale": 500.0, "target_return": 1800.0,
                "state_mean": list(np.arange(STATE_DIM) * 0.1), "state_std": [2.0] * STATE_DIM}
    adapter = DecisionAdapter.from_pretrained(save_tiny_dt(tmp_path / "m", settings=settings))
    assert (adapter.context, adapter.return_scale, adapter.target_return) == (7, 500.0, 1800.0)
    obs = np.ones((1, STATE_DIM))
    np.testing.assert_allclose(adapter.normalise(obs).numpy(), (1 - np.arange(STATE_DIM) * 0.1)[None] / 2, rtol=1e-6)
    assert DecisionAdapter.from_pretrained(dt_dir, context=3).context == 3


def test_wrong_state_dimension_is_named(adapter):
    with pytest.raises(TokenmemError, match=r"dimension 11 .*Walker2d-v5.*\(17,\)"):
        rollout(adapter, CachedPolicy(adapter), [make_env("Walker2d-v5")], [0], max_steps=3)
    with pytest.raises(TokenmemError, match="dimension 17 but the model expects 11"):
        adapter.predict_actions(torch.zeros(1, 2, 17), torch.zeros(1, 2, 3), torch.zeros(1, 2, 1),
                                torch.zeros(1, 2, dtype=torch.long))


def test_other_errors(adapter, tmp_path):
    with pytest.raises(TokenmemError, match="unknown environment id 'Ant-v5'"):
        make_env("Ant-v5")
    with pytest.raises(TokenmemError, match="max_ep_len=1000"):
        rollout(adapter, CachedPolicy(adapter), hoppers(1), [0], max_steps=1001)
    with pytest.raises(TokenmemError, match="one seed per environment"):
        rollout(adapter, CachedPolicy(adapter), hoppers(2), [0], max_steps=3)
    with pytest.raises(TokenmemError, match="not a local directory"):
        DecisionAdapter.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(TokenmemError, match="needs a budget"):
        rollout(adapter, CachedPolicy(adapter, "recent"), hoppers(1), [0], max_steps=3)


def test_rollout_cli(dt_dir, capsys):
    from tokenmem.cli import main

    code = main(["rollout", "--env", "Hopper-v5", "--model", dt_dir, "--evictor", "h2o", "--budget", "30",
                 "--episodes", "3", "--batch", "2", "--seed", "5", "--max-steps", "12", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("Hopper-v5  evictor=h2o  budget=30")
    rows = [line.split() for line in lines[2:5]]
    assert [(r[0], r[1]) for r in rows] == [("0", "5"), ("1", "6"), ("2", "7")]
    assert all(int(r[3]) <= 12 for r in rows)
    returns = [float(r[2]) for r in rows]
    assert float(lines[5].split()[1]) == pytest.approx(np.mean(returns), abs=0.06)
    assert "last memory: evictor=h2o budget=30" in out

    assert main(["rollout", "--env", "Hopper-v4", "--model", dt_dir]) == 2
    assert "unknown environment id 'Hopper-v4' (did you mean 'Hopper-v5'?)" in capsys.readouterr().err
    assert main(["rollout", "--env", "Walker2d-v5", "--model", dt_dir, "--no-progress"]) == 2
    assert "dimension 11" in capsys.readouterr().err


def test_rollout_cli_video(dt_dir, tmp_path, capsys):
    """Writes an .mp4 where MuJoCo can render offscreen, else fails early with the renderer message."""
    from tokenmem.cli import main

    video = tmp_path / "episode.mp4"
    code = main(["rollout", "--model", dt_dir, "--episodes", "1", "--max-steps", "5", "--no-progress",
                 "--video", str(video)])
    captured = capsys.readouterr()
    if code == 0:
        import imageio.v3 as iio

        frames = iio.imread(video)
        assert frames.shape[0] == 6 and frames.shape[-1] == 3 and frames.std() > 1
    else:
        assert "cannot render offscreen" in captured.err and not video.exists()


def test_decision_benchmark_runs_and_reports(dt_dir, tmp_path, capsys):
    """benchmarks/decision.py end to end on a tiny DT: every row, both speed settings, NAMM's kept tokens."""
    import json

    from conftest import load_benchmark

    bench = load_benchmark("decision")
    out = tmp_path / "decision.json"
    assert bench.main(["--model", dt_dir, "--episodes", "2", "--batch", "2", "--max-steps", "30", "--budget", "12",
                       "--history", "8", "--speed-steps", "3", "--speed-intervals", "6", "--out", str(out),
                       "--evictors", "full", "recent", "sink", "h2o", "namm",
                       "--decode-span", "1"]) == 0  # evict after every step: NAMM's interval exceeds 30 steps
    result = json.loads(out.read_text())
    configs = [r["config"] for r in result["quality"]]
    assert configs == ["reference (K=20)", "cached full history", "cached recent", "cached sink", "cached h2o",
                       "cached namm (language-trained scorer)"]
    for row in result["quality"]:
        assert len(row["returns"]) == 2 and np.isfinite(row["score_mean"])
    assert [s["history"] for s in result["speed"]] == [20, 8]
    for s in result["speed"]:
        assert s["reference"] > 0 and s["cached"] > 0 and s["cached_full"] > 0 and s["cached_every"] > 0
        assert s["cached_iv6"] > 0 and s["speedup_iv6"] == s["cached_iv6"] / s["reference"]
    kept = result["namm_kept"]["modality"]
    assert set(kept) <= {"return", "state", "action"} and sum(kept.values()) > 0  # NAMM evicted at budget 12
    table = capsys.readouterr().out
    assert "| cached namm (language-trained scorer) | 12 |" in table and "decode_span: 1;" in table
    for row in result["quality"][1:]:  # decode_span=1: held <= budget after every step
        assert row["held_max"] <= (12 if row["budget"] else 3 * 30)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shipped_dt_cached_equals_reference_loop(seed):
    """The shipped Hopper DT: no eviction, K steps, the cached rollout's actions equal the official loop's
    (run on a never-prepared copy of the model)."""
    from transformers import DecisionTransformerModel

    from tokenmem.envs import shipped_dt_path

    path = str(shipped_dt_path())
    adapter = DecisionAdapter.from_pretrained(path)
    assert adapter.env_id == "Hopper-v5" and adapter.context == 20 and adapter.target_return == 3600
    plain = DecisionTransformerModel.from_pretrained(path).eval()
    ref = rollout(adapter, ReferencePolicy(adapter, model=plain), hoppers(1), [seed], max_steps=20)
    cached = rollout(adapter, CachedPolicy(adapter), hoppers(1), [seed], max_steps=20)
    assert ref.lengths[0] == cached.lengths[0] == 20
    np.testing.assert_allclose(cached.actions[0], ref.actions[0], rtol=0, atol=1e-5)
    assert np.abs(ref.actions[0]).max() > 0.1  # a trained policy acts
