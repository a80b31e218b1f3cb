"""Per-token metadata (TokenMeta): what a stored token is, filled by adapters, read by evictors.

The memory keeps metadata packed in one int64 tensor ``[batch, kv_heads, tokens, FIELDS]`` per layer so
that appending and compacting touch one tensor; :class:`TokenMeta` is a named view of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import TokenmemError

# Column order of the packed metadata tensor.
POSITION, ROPE, MODALITY, SEGMENT, FLAGS, TOKEN = range(6)
FIELDS = 6

# Modalities are small integers so that they pack; names are the public face.
MODALITIES: dict[str, int] = {
    "text": 0,
    "frame": 1,
    "image": 2,
    "return": 3,
    "state": 4,
    "action": 5,
    "audio": 6,
}
MODALITY_NAMES = {v: k for k, v in MODALITIES.items()}

# Flag bits.
SEPARATOR = 1  # punctuation / whitespace token (SepLLM)
SINK = 2  # adapter-declared attention sink
PAD = 4  # padding: never attended, evicted first
PROTECT = 8  # always kept by the memory whatever the evictor says (e.g. the question of a video QA)

FLAG_NAMES = {"separator": SEPARATOR, "sink": SINK, "pad": PAD, "protect": PROTECT}


def modality_code(name: str) -> int:
    """The integer code of a modality name, with a clear error for unknown names."""
    try:
        return MODALITIES[name]
    except KeyError:
        raise TokenmemError(
            f"unknown modality {name!r}; known modalities: {', '.join(MODALITIES)}. "
            "Register a new one with tokenmem.meta.register_modality(name)."
        ) from None


def register_modality(name: str) -> int:
    """Add a modality name (idempotent) and return its code."""
    if name not in MODALITIES:
        code = max(MODALITIES.values()) + 1
        MODALITIES[name] = code
        MODALITY_NAMES[code] = name
    return MODALITIES[name]


@dataclass
class TokenMeta:
    """Metadata of a set of tokens; every field has the same shape (``[batch, tokens]`` from adapters,
    ``[batch, kv_heads, tokens]`` inside the memory).

    - ``position``: index of the token in the stream fed to the model (0 = first token ever seen),
    - ``modality``: integer code (see :data:`MODALITIES`),
    - ``segment``: frame index, timestep, ... (0 when the modality has none),
    - ``flags``: bit set of :data:`SEPARATOR`, :data:`SINK`, :data:`PAD`, :data:`PROTECT`,
    - ``token``: input id when known, else -1; for video tokens (modality ``frame``, whose input ids are all
      the one placeholder) the video adapter stores the token's index inside its frame instead,
    - ``rope``: the position the stored key is currently rotated at (memory-internal; equals the model's
      position id in ``original`` mode).
    """

    position: torch.Tensor
    modality: torch.Tensor
    segment: torch.Tensor
    flags: torch.Tensor
    token: torch.Tensor
    rope: torch.Tensor

    @classmethod
    def from_packed(cls, packed: torch.Tensor) -> "TokenMeta":
        """Named views of a packed ``[..., FIELDS]`` int64 tensor (no copy)."""
        return cls(
            position=packed[..., POSITION],
            modality=packed[..., MODALITY],
            segment=packed[..., SEGMENT],
            flags=packed[..., FLAGS],
            token=packed[..., TOKEN],
            rope=packed[..., ROPE],
        )

    @classmethod
    def build(
        cls,
        batch: int,
        tokens: int,
        *,
        start: int = 0,
        modality: str | torch.Tensor = "text",
        segment: int | torch.Tensor = 0,
        flags: int | torch.Tensor = 0,
        token: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> "TokenMeta":
        """Metadata for ``tokens`` new tokens of each of ``batch`` sequences, positions from ``start``."""
        shape = (batch, tokens)
        pos = torch.arange(start, start + tokens, device=device).expand(shape)

        def full(value):
            if isinstance(value, torch.Tensor):
                return value.to(device=device, dtype=torch.long).expand(shape)
            return torch.full(shape, int(value), dtype=torch.long, device=device)

        mod = modality_code(modality) if isinstance(modality, str) else modality
        return cls(
            position=pos,
            modality=full(mod),
            segment=full(segment),
            flags=full(flags),
            token=full(-1 if token is None else token),
            rope=pos,
        )

    def pack(self) -> torch.Tensor:
        """One int64 tensor ``[..., FIELDS]`` in column order."""
        cols = [None] * FIELDS
        cols[POSITION], cols[ROPE], cols[MODALITY] = self.position, self.rope, self.modality
        cols[SEGMENT], cols[FLAGS], cols[TOKEN] = self.segment, self.flags, self.token
        shape = torch.broadcast_shapes(*(c.shape for c in cols))
        return torch.stack([c.to(torch.long).expand(shape) for c in cols], dim=-1)

    # -- convenient predicates ------------------------------------------------------------------
    @property
    def valid(self) -> torch.Tensor:
        """True for real tokens, False for padding."""
        return (self.flags & PAD) == 0

    @property
    def is_separator(self) -> torch.Tensor:
        return (self.flags & SEPARATOR) != 0

    @property
    def is_sink(self) -> torch.Tensor:
        return (self.flags & SINK) != 0

    @property
    def is_protected(self) -> torch.Tensor:
        return (self.flags & PROTECT) != 0

    def modality_is(self, name: str) -> torch.Tensor:
        return self.modality == modality_code(name)


# -- the metadata of one forward call's new tokens (built by the memory at the call's first layer) ----------
def rope_rows(position_ids: torch.Tensor) -> torch.Tensor:
    """The rotary position the memory stores (``TokenMeta.rope``) from position ids with a leading axis:
    M-RoPE's ``[3, b, q]`` (temporal, height, width) gives its temporal row; ``[4, b, q]`` (text positions
    prepended, as transformers' Qwen2-VL passes them) its second row, the temporal one."""
    return position_ids[1] if position_ids.shape[0] == 4 else position_ids[0]


def pack_call(batch: int, tokens: int, start: int, device, *, annotation: "TokenMeta | None" = None,
              input_ids: torch.Tensor | None = None, separator_ids: torch.Tensor | None = None,
              mask2d: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
              mrope_position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """Packed metadata ``[batch, tokens, FIELDS]`` of a forward call's new tokens, and whether any is padding.

    Positions count from ``start`` (tokens seen before the call); ``annotation`` (from ``memory.annotate``)
    gives modality, segment, flags and token (an annotated token >= 0 wins over the input id); ``input_ids``
    fill the token field and, with ``separator_ids``, the separator flag; ``mask2d`` (the 2D attention mask
    over every token seen) marks padding; ``position_ids`` (``[b, q]``, ``[1, q]``, or with a leading M-RoPE
    axis) or else ``mrope_position_ids`` give the rotary position (see :func:`rope_rows`), by default the
    stream position.
    """
    b, q = batch, tokens
    meta = torch.zeros(b, q, FIELDS, dtype=torch.long, device=device)
    meta[..., POSITION] = torch.arange(start, start + q, device=device)
    if annotation is not None:
        if tuple(annotation.position.shape) != (b, q):
            raise TokenmemError(
                f"memory.annotate() got metadata for {tuple(annotation.position.shape)} tokens but the forward call "
                f"appends {b} x {q}; annotate exactly the tokens of the next call"
            )
        packed = annotation.pack().to(device)
        for col in (MODALITY, SEGMENT, FLAGS):
            meta[..., col] = packed[..., col]
        meta[..., TOKEN] = packed[..., TOKEN]
    else:
        meta[..., TOKEN] = -1
    if input_ids is not None and tuple(input_ids.shape) == (b, q):
        ids = input_ids.to(device)
        meta[..., TOKEN] = torch.where(meta[..., TOKEN] >= 0, meta[..., TOKEN], ids)  # annotated values win
        if separator_ids is not None:
            is_sep = torch.isin(ids, separator_ids.to(device))
            meta[..., FLAGS] |= is_sep.long() * SEPARATOR
    padded = False
    if mask2d is not None:
        pad = ~mask2d[:, -q:].to(device=device, dtype=torch.bool)
        if bool(pad.any()):
            padded = True
            meta[..., FLAGS] |= pad.long() * PAD
    if position_ids is not None and position_ids.dim() == 3:  # M-RoPE handed to attention
        mrope_position_ids, position_ids = position_ids, None
    if mrope_position_ids is not None and mrope_position_ids.shape[-1] == q:
        meta[..., ROPE] = rope_rows(mrope_position_ids).to(device).reshape(-1, q).expand(b, q)
    elif position_ids is not None and position_ids.shape[-1] == q:
        meta[..., ROPE] = position_ids.to(device).reshape(-1, q).expand(b, q)
    else:
        meta[..., ROPE] = meta[..., POSITION]
    return meta, padded
