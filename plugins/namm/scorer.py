"""The NAMM scorer: a backward-attention memory (BAM) network over a layer's tokens.

One attention head (hidden ``32`` with bias) in which token ``i`` attends to itself and every newer
token ``j >= i`` (tokens ordered by position); its 50-dim output (``2 x features``) splits into a
residual ``r`` and a multiplicative ``m``: ``h = x * (1 + m) + r``; a linear ``features -> 1`` gives the
score. One parameter vector (4,172 values with the default 25 features) is shared by all layers and
heads. The backward attention runs in a fused, blocked kernel: no ``n x n`` buffer.
(Cetin et al., "An Evolved Universal Transformer Memory", 2024, arXiv:2410.13166.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import NAMMConfig


_BLOCKED = 1e4  # logit offset that removes a key (exp(-1e4) == 0 in float32)


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
    A zero init would let the first perturbations evict everything.

    With the key feature (``cfg.key_diff``) its output weight is 1 and the bias ``score + 1``: every token scores
    ``score + 1 + key_distinctiveness >= score`` (still keeps all without a budget), and under a budget the kept
    tokens are KeyDiff's. The search then starts from the strongest training-free evictor on retrieval, not from
    recency."""
    vector = torch.zeros(num_params(cfg))
    vector[-1] = score
    if cfg.key_diff:
        vector[-2] = 1.0  # ws[-1]: the key feature is the last input feature
        vector[-1] = score + 1.0
    return vector


def bam_scores(x: torch.Tensor, valid: torch.Tensor, params: dict[str, torch.Tensor], block: int = 1024) -> torch.Tensor:
    """Scores ``[B, n]`` of tokens ``x [B, n, features]`` (ordered by position); ``valid [B, n]`` marks
    tokens that can be attended. Backward mask: query ``i`` sees keys ``j >= i``.

    The backward attention runs in PyTorch's fused scaled-dot-product kernel (blocked inside, no
    ``n x n`` buffer): reversing the token order turns the backward mask into the causal one, and one
    extra channel (``-BIG`` on the keys of tokens that cannot be attended, ``1`` on the queries) removes
    those keys without a mask tensor. (``block`` is kept for API compatibility.)
    """
    B, n, f = x.shape
    x = x.to(torch.float32)
    hidden_size = params["wq"].shape[-1]
    scale = hidden_size**-0.5
    # one projection into [q | 1 | k | blocked | v | 0] channels, on the tokens newest first (without padding
    # the extra channel adds nothing and is left out: a 32-wide head is faster in the fused kernel)
    extra = 0 if bool(valid.all()) else 1
    width = hidden_size + extra
    w = torch.zeros(f, 3 * width, device=x.device)
    bias = torch.zeros(3 * width, device=x.device)
    for i, name in enumerate("qkv"):
        w[:, i * width : i * width + hidden_size] = params["w" + name]
        bias[i * width : i * width + hidden_size] = params["b" + name]
    if extra:
        bias[hidden_size] = 1.0  # the queries' extra channel
    qkv = torch.addmm(bias, x.flip(1).reshape(B * n, f), w).view(B, n, 3, width)
    if extra:
        qkv[:, :, 1, hidden_size] = (~valid.flip(1)).to(torch.float32) * (-_BLOCKED / scale)  # keys not to be seen
    qkv = qkv.permute(0, 2, 1, 3)  # [B, 3, n, width]
    attended = F.scaled_dot_product_attention(qkv[:, 0:1], qkv[:, 1:2], qkv[:, 2:3], is_causal=True, scale=scale)
    attended = attended[:, 0].flip(1)[..., :hidden_size]  # [B, n, k]
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
