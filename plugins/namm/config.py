"""NAMM settings: the paper's values are the defaults (Cetin et al., "An Evolved Universal Transformer
Memory", 2024, arXiv:2410.13166); every one is a field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from tokenmem.errors import TokenmemError


@dataclass(frozen=True)
class NAMMConfig:
    n_fft: int = 32  # STFT window (queries)
    hop: int = 16  # STFT hop (queries)
    ema: float = 0.99  # per-query EMA coefficient; a frame weighs ema**hop relative to the next
    interval: int = 512  # queries between NAMM updates (a multiple of hop)
    recency_dim: int = 8  # sin/cos embedding of token age
    recency_base: float = 10000.0
    hidden: int = 32  # BAM attention width
    threshold: float = 0.0  # keep tokens scoring >= threshold
    norm_eps: float = 1e-6
    block: int = 1024  # BAM block size (tokens): no n x n buffer
    # one more input feature per token: KeyDiff's key distinctiveness, minus the cosine of the token's key with its
    # head's mean key (tokenmem's extension, not in the paper; the v1/v2 scorers have it off)
    key_diff: bool = False

    def __post_init__(self):
        if self.n_fft <= self.hop or self.hop <= 0:
            raise TokenmemError(f"NAMM needs 0 < hop < n_fft, got hop={self.hop}, n_fft={self.n_fft}")
        if self.interval <= 0 or self.interval % self.hop:
            raise TokenmemError(f"NAMM interval ({self.interval}) must be a positive multiple of hop ({self.hop})")
        if self.recency_dim % 2:
            raise TokenmemError(f"recency_dim must be even, got {self.recency_dim}")
        if not 0.0 < self.ema <= 1.0:
            raise TokenmemError(f"ema must lie in (0, 1], got {self.ema}")

    @property
    def bins(self) -> int:
        """One-sided STFT frequency bins."""
        return self.n_fft // 2 + 1

    @property
    def features(self) -> int:
        return self.recency_dim + self.bins + int(self.key_diff)

    @property
    def tail(self) -> int:
        """Samples of each token's signal carried into the next update (``n_fft - hop``)."""
        return self.n_fft - self.hop

    def to_dict(self) -> dict:
        """The fields; ``key_diff`` only when on, so a scorer or evolution checkpoint without the key feature is
        written (and signed) exactly as before the field existed."""
        data = asdict(self)
        if not self.key_diff:
            data.pop("key_diff")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "NAMMConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TokenmemError(f"unknown NAMM config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
