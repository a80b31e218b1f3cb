"""The NAMM scorer: a backward-attention memory (BAM) network over a layer's tokens.

One attention head (hidden ``32`` with bias) in which token ``i`` attends to itself and every newer
token ``j >= i`` (tokens ordered by position); its 50-dim output (``2 x features``) splits into a
residual ``r`` and a multiplicative ``m``: ``h = x * (1 + m) + r``; a linear ``features -> 1`` gives the
score. One parameter vector (4,172 values with the default 25 features) is shared by all layers and
heads. The backward attention is computed in blocks with an online softmax: no ``n x n`` buffer.
(Cetin et al., "An Evolved Universal Transformer Memory", 2024, arXiv:2410.13166.)
"""

from __future__ import annotations

import math

import torch

from .config import NAMMConfig


def layout(cfg: NAMMConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Order and shapes of the parameters inside the flat vector."""
    f, k = cfg.features, cfg.hidden
    return [("wq", (f, k)), ("bq", (k,)), ("wk", (f, k)), ("bk", (k,)), ("wv", (f, k)), ("bv", (k,)),
            ("wo", (k, 2 * f)), ("bo", (2 * f,)), ("ws", (f,)), ("bs", ())]


def num_params(cfg: NAMMConfig) -> int:
    return sum(math.prod(shape) for _, shape in layout(cfg))


def unflatten(vector: torch.Tensor, cfg: NAMMConfig) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, shape in layout(cfg):
        size = math.prod(shape)
        out[name] = vector[i : i + size].view(shape)
        i += size
    return out


def initial_params(cfg: NAMMConfig, score: float = 1.0) -> torch.Tensor:
    """All weights zero and the output bias ``score`` > 0: every token scores ``score`` (keeps all).
    A zero init would let the first perturbations evict everything."""
    vector = torch.zeros(num_params(cfg))
    vector[-1] = score
    return vector


def bam_scores(x: torch.Tensor, valid: torch.Tensor, params: dict[str, torch.Tensor], block: int = 256) -> torch.Tensor:
    """Scores ``[B, n]`` of tokens ``x [B, n, features]`` (ordered by position); ``valid [B, n]`` marks
    tokens that can be attended. Backward mask: query ``i`` sees keys ``j >= i``."""
    B, n, f = x.shape
    x = x.to(torch.float32)
    q = x @ params["wq"] + params["bq"]
    k = x @ params["wk"] + params["bk"]
    v = x @ params["wv"] + params["bv"]
    scale = q.shape[-1] ** -0.5
    attended = torch.empty(B, n, v.shape[-1], dtype=torch.float32, device=x.device)
    idx = torch.arange(n, device=x.device)
    for s in range(0, n, block):
        e = min(n, s + block)
        qb = q[:, s:e] * scale  # [B, c, k]
        m = torch.full((B, e - s, 1), float("-inf"), device=x.device)
        l = torch.zeros(B, e - s, 1, device=x.device)
        acc = torch.zeros(B, e - s, v.shape[-1], device=x.device)
        for t in range(s, n, block):  # only keys at or after the block: the backward mask
            u = min(n, t + block)
            sc = qb @ k[:, t:u].transpose(1, 2)  # [B, c, kb]
            allowed = valid[:, None, t:u]
            if t < e:  # diagonal block: j >= i
                allowed = allowed & (idx[None, t:u] >= idx[s:e, None])[None]
            sc = sc.masked_fill(~allowed, float("-inf"))
            m_new = torch.maximum(m, sc.amax(-1, keepdim=True))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(sc - safe)
            corr = torch.exp(torch.where(torch.isinf(m), torch.full_like(m, float("-inf")), m - safe))
            l = l * corr + p.sum(-1, keepdim=True)
            acc = acc * corr + p @ v[:, t:u]
            m = m_new
        attended[:, s:e] = torch.where(l > 0, acc / l.clamp_min(1e-30), torch.zeros_like(acc))
    out = attended @ params["wo"] + params["bo"]  # [B, n, 2f]
    r, mult = out[..., :f], out[..., f:]
    hidden = x * (1.0 + mult) + r
    return hidden @ params["ws"] + params["bs"]


def bam_scores_dense(x, valid, params):
    """The same network with an explicit ``n x n`` mask (for tests only)."""
    B, n, f = x.shape
    x = x.to(torch.float64)
    p = {k: v.to(torch.float64) for k, v in params.items()}
    q, k, v = x @ p["wq"] + p["bq"], x @ p["wk"] + p["bk"], x @ p["wv"] + p["bv"]
    sc = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(n, n, dtype=torch.bool).triu()[None] & valid[:, None, :]
    attn = torch.softmax(sc.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    out = (attn @ v) @ p["wo"] + p["bo"]
    hidden = x * (1 + out[..., f:]) + out[..., :f]
    return hidden @ p["ws"] + p["bs"]
