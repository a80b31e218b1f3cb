"""NAMM token features: attention spectrogram (STFT) -> EMA over frames, normalisation, recency.

For each stored token of a (layer, KV head), its attention column over the newest queries (the
memory's window statistics; GQA: mean over the group's query heads) is a signal in time. Each update
sees the queries since the last one, left-padded with the last ``n_fft - hop`` samples kept from the
previous update (zeros for a new sequence); a periodic-Hann STFT with ``center=False`` gives one-sided
magnitudes per frame. Frames that end before the token existed are masked out; the others enter an
exponential moving average whose per-query coefficient is ``ema`` (a frame weighs ``ema**hop`` relative
to the next) and the previous state carries over multiplied by ``ema**queries``. All in float32.
"""

from __future__ import annotations

import math

import torch

from .config import NAMMConfig

TOKEN_BLOCK = 2048  # tokens per STFT block (bounds the frame buffer)
_BASIS: dict = {}


def dft_basis(cfg: NAMMConfig, device) -> torch.Tensor:
    """``[n_fft, 2 * bins]`` real matrix of the periodic-Hann-windowed one-sided DFT: ``frame @ basis``
    gives ``[Re X_0..Re X_{bins-1}, Im X_0..]`` (a matmul is much faster than many tiny FFTs)."""
    key = (cfg.n_fft, str(device))
    if key not in _BASIS:
        n = torch.arange(cfg.n_fft, dtype=torch.float64)
        k = torch.arange(cfg.bins, dtype=torch.float64)
        window = torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float64)
        angle = 2 * math.pi * n[:, None] * k[None, :] / cfg.n_fft
        basis = torch.cat([window[:, None] * torch.cos(angle), -window[:, None] * torch.sin(angle)], dim=1)
        _BASIS[key] = basis.to(device=device, dtype=torch.float32)
    return _BASIS[key]


def _split_basis(cfg: NAMMConfig, device) -> torch.Tensor:
    """``[4 * bins, hop]``: the transposed DFT basis of the window's first ``hop`` samples stacked over that of
    its last ``hop`` samples (``n_fft == 2 * hop``)."""
    key = ("split", cfg.n_fft, str(device))
    if key not in _BASIS:
        basis = dft_basis(cfg, device)
        _BASIS[key] = torch.cat([basis[: cfg.hop].T, basis[cfg.hop :].T], dim=0).contiguous()
    return _BASIS[key]


def frame_weights(frames: int, start: torch.Tensor, cfg: NAMMConfig) -> torch.Tensor:
    """``[..., frames]`` EMA weights: ``gamma**(frames-1-f)`` where frame ``f`` ends after the token's
    first sample ``start`` (in padded-signal coordinates), else 0."""
    f = torch.arange(frames, device=start.device)
    ends = f * cfg.hop + cfg.n_fft  # exclusive end sample of each frame
    gamma = cfg.ema ** cfg.hop
    w = gamma ** (frames - 1 - f).to(torch.float32)
    return torch.where(ends > start[..., None], w, torch.zeros((), device=start.device))


def update_ema(
    ema: torch.Tensor,  # [b, h, n, bins] float32
    tail: torch.Tensor,  # [b, h, n, n_fft - hop] float32
    rows: torch.Tensor,  # [b, h, t, n] attention rows of the t newest queries (oldest first)
    first_query: torch.Tensor,  # [b, h, n] index in 0..t-1 of the first query that saw each token (0 if older)
    cfg: NAMMConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new EMA state and tail after one update with ``t`` queries (``t`` a multiple of ``hop``)."""
    b, h, t, n = rows.shape
    if t % cfg.hop:
        raise ValueError(f"update_ema needs a multiple of hop={cfg.hop} queries, got {t}")
    pad = cfg.tail
    frames = (pad + t - cfg.n_fft) // cfg.hop + 1 if pad + t >= cfg.n_fft else 0
    basis = dft_basis(cfg, rows.device)  # [n_fft, 2 * bins]: windowed cos | -sin
    new_ema = ema * (cfg.ema ** t)
    new_tail = torch.empty_like(tail)
    for s in range(0, n, TOKEN_BLOCK):
        e = min(n, s + TOKEN_BLOCK)
        signal = torch.cat([tail[:, :, s:e], rows[..., s:e].transpose(2, 3).to(torch.float32)], dim=-1)  # [b,h,c,pad+t]
        new_tail[:, :, s:e] = signal[..., signal.shape[-1] - pad :]
        if frames == 0:
            continue
        framed = signal.unfold(-1, cfg.n_fft, cfg.hop)  # [b, h, c, frames, n_fft]
        reim = framed @ basis  # [b, h, c, frames, 2 * bins]: the one-sided DFT of the windowed frames
        spec = torch.sqrt(reim[..., : cfg.bins] ** 2 + reim[..., cfg.bins :] ** 2)  # magnitudes
        weights = frame_weights(frames, first_query[:, :, s:e] + pad, cfg)  # [b, h, c, frames]
        new_ema[:, :, s:e] += torch.einsum("bhcf,bhcfk->bhck", weights, spec)
    return new_ema, new_tail


def update_ema_aligned(
    ema: torch.Tensor,  # [b, h, n, bins] float32
    tail: torch.Tensor,  # [b, h, n, n_fft - hop] float32
    rows: torch.Tensor,  # [b, h, t, n] attention rows of the t newest queries (oldest first), t a multiple of hop
    cfg: NAMMConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`update_ema` when every token existed before the first of the ``t`` queries (``first_query`` all
    zero; a token appended during the queries gets zero attention before it exists, so its early frames add
    nothing either -- the memory's streaming case). Needs ``n_fft == 2 * hop`` (the paper's setting).

    The rows stay in their ``[queries, tokens]`` layout (no transpose of the ``t x n`` block): frame ``f``
    covers hop blocks ``f - 1`` and ``f`` (block ``-1`` is the tail), so its windowed DFT is
    ``basis[:hop]^T @ block_{f-1} + basis[hop:]^T @ block_f``, two batched matmuls over every frame.
    """
    b, h, t, n = rows.shape
    hop = cfg.hop
    if t % hop or cfg.n_fft != 2 * hop:
        raise ValueError(f"update_ema_aligned needs t a multiple of hop={hop} and n_fft == 2 * hop")
    frames, k2 = t // hop, 2 * cfg.bins
    halves = _split_basis(cfg, rows.device)  # [2 * 2 bins, hop]: (first half of the window)^T over (second half)^T
    blocks = rows.to(torch.float32).reshape(b, h, frames, hop, n)  # [b, h, F, hop, n]
    both = torch.matmul(halves, blocks)  # [b, h, F, 4 bins, n]: each block under both window halves
    reim = both[:, :, :, k2:]  # the block as frame f's second half
    reim[:, :, 1:] += both[:, :, :-1, :k2]  # the previous block as its first half
    reim[:, :, 0] += torch.matmul(halves[:k2], tail.transpose(2, 3))  # frame 0's first half: the tail
    spec = reim[:, :, :, : cfg.bins].square_().add_(reim[:, :, :, cfg.bins :].square_()).sqrt_()  # [b, h, F, bins, n]
    gamma = cfg.ema ** hop
    weights = gamma ** torch.arange(frames - 1, -1, -1, device=rows.device, dtype=torch.float32)  # [F]
    contribution = torch.matmul(weights, spec.reshape(b, h, frames, -1)).view(b, h, cfg.bins, n)  # [b, h, bins, n]
    new_ema = ema * (cfg.ema ** t) + contribution.transpose(2, 3)
    new_tail = blocks[:, :, -1].transpose(2, 3).contiguous()  # the last hop samples: [b, h, n, hop]
    return new_ema, new_tail


def recency_features(age: torch.Tensor, cfg: NAMMConfig) -> torch.Tensor:
    """``[..., recency_dim]`` sin/cos embedding of token age (no cap: any age works)."""
    half = cfg.recency_dim // 2
    freqs = torch.exp(-math.log(cfg.recency_base) * torch.arange(half, device=age.device, dtype=torch.float32) * 2 / cfg.recency_dim)
    angle = age.to(torch.float32)[..., None] * freqs
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def normalise(ema: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, cfg: NAMMConfig) -> torch.Tensor:
    return (ema - mean) / torch.sqrt(var + cfg.norm_eps)
