"""Helpers for the Decision Transformer tests: a tiny random DT saved and loaded with ``from_pretrained``,
random-policy episodes of a MuJoCo task, and one torch thread while the tests run (2 shared cores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

STATE_DIM, ACT_DIM = 11, 3  # Hopper-v5


def tiny_dt_config(state_dim=STATE_DIM, act_dim=ACT_DIM, **overrides):
    from transformers import DecisionTransformerConfig

    cfg = dict(state_dim=state_dim, act_dim=act_dim, hidden_size=32, n_layer=2, n_head=2, n_inner=64,
               max_ep_len=1000, n_positions=64, activation_function="relu", bos_token_id=None, eos_token_id=None)
    cfg.update(overrides)
    return DecisionTransformerConfig(**cfg)


def save_tiny_dt(path, seed: int = 0, settings: dict | None = None, **overrides) -> str:
    """A random DT with weights scaled up (so that actions vary visibly with the inputs), saved to ``path``."""
    from transformers import DecisionTransformerModel

    torch.manual_seed(seed)
    model = DecisionTransformerModel(tiny_dt_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wpe" not in name:
                p.mul_(3.0)
    model.config.tokenmem = settings if settings is not None else {
        "env_id": "Hopper-v5", "context": 20, "return_scale": 1000.0, "target_return": 3600.0,
        "state_mean": [0.0] * model.config.state_dim, "state_std": [1.0] * model.config.state_dim}
    model.save_pretrained(path)
    return str(path)


def random_episodes(env_id: str, count: int, seed: int = 0, max_len: int = 60):
    """Uniform-random-action episodes (cut at ``max_len`` steps, marked truncated)."""
    from tokenmem.envs import make_env
    from tokenmem.envs.datasets import Episode

    env = make_env(env_id)
    env.action_space.seed(seed)
    out = []
    for i in range(count):
        obs, _ = env.reset(seed=seed + i)
        o, a, r, te, tr = [obs], [], [], [], []
        while True:
            act = env.action_space.sample()
            obs, rew, term, trunc, _ = env.step(act)
            trunc = trunc or len(r) + 1 >= max_len
            o.append(obs), a.append(act), r.append(rew), te.append(term), tr.append(trunc)
            if term or trunc:
                break
        out.append(Episode(np.stack(o), np.stack(a).astype(np.float32), np.array(r), np.array(te), np.array(tr),
                           seed=seed + i))
    env.close()
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on two shared cores, more threads mostly wait on each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
