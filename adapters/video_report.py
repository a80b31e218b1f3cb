"""What a memory kept of a video: per-frame counts of held tokens, per layer and KV head (from TokenMeta)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmem.errors import TokenmemError
from tokenmem.meta import MODALITIES


@dataclass
class FrameReport:
    """Held tokens of one batch row after a QA call.

    ``kept[layer, kv_head, frame]`` counts the held (attended) tokens of each frame; ``text[layer, kv_head]``
    the held text tokens; ``other[layer, kv_head]`` the remaining held slots (left padding and slots masked by
    a ragged eviction). ``kept.sum(-1) + text + other`` is the memory's ``held_slots`` of each layer
    (``memory.stats()``; its ``held_per_head`` is ``kept.sum(-1) + text`` for this row)
    """

    kept: torch.Tensor  # [layers, kv_heads, frames] int64
    text: torch.Tensor  # [layers, kv_heads] int64
    other: torch.Tensor  # [layers, kv_heads] int64
    tokens_per_frame: int
    frames_per_column: int = 1  # video frames per column: 1, or 2 for Qwen2-VL's temporal patches

    @classmethod
    def from_memory(cls, memory, row: int, frames: int, tokens_per_frame: int,
                    frames_per_column: int = 1) -> "FrameReport":
        kept, text, other = [], [], []
        for layer in memory.layers:
            meta = layer.meta  # fields [b, h, held]
            valid = meta.valid[row]
            frame = valid & (meta.modality[row] == MODALITIES["frame"])
            segment = torch.where(frame, meta.segment[row], frames)  # non-frame slots land in an extra bin
            if bool((segment < 0).any()) or bool((segment > frames).any()):
                raise TokenmemError(f"layer {layer.index} holds frame tokens whose frame index is outside "
                                    f"0..{frames - 1}; the memory was annotated for another video")
            counts = torch.zeros(segment.shape[0], frames + 1, dtype=torch.long, device=segment.device)
            counts.scatter_add_(1, segment, torch.ones_like(segment))
            kept.append(counts[:, :frames].cpu())
            text.append((valid & (meta.modality[row] == MODALITIES["text"])).sum(-1).cpu())
            other.append((~valid).sum(-1).cpu())
        return cls(torch.stack(kept), torch.stack(text), torch.stack(other), tokens_per_frame, frames_per_column)

    @property
    def frames(self) -> int:
        return self.kept.shape[-1]

    @property
    def held(self) -> torch.Tensor:
        """``[layers, kv_heads]`` slots held (what ``memory.stats()["held_slots"]`` reports per layer)."""
        return self.kept.sum(-1) + self.text + self.other

    def columns_of(self, frames) -> list[int]:
        """The columns holding the given video frames (a Qwen2-VL temporal patch holds frames 2t and 2t + 1)."""
        return sorted({int(f) // self.frames_per_column for f in frames})

    def fraction(self) -> torch.Tensor:
        """``[layers, frames]``: share of each frame's tokens held, mean over KV heads."""
        return self.kept.float().mean(1) / self.tokens_per_frame

    def table(self, max_columns: int = 32) -> str:
        """Compact text table: one line per layer, one column per frame (percent of the frame's tokens held,
        mean over KV heads; frames are grouped when there are more than ``max_columns``)."""
        frac = self.fraction()
        groups = max(1, -(-self.frames // max_columns))
        cols = [(s, min(s + groups, self.frames)) for s in range(0, self.frames, groups)]
        unit = "frame" if self.frames_per_column == 1 else f"{self.frames_per_column}-frame patch"
        head = "frame " if groups == 1 else f"frames/{groups} "
        if self.frames_per_column > 1:
            head = "patch " if groups == 1 else f"patches/{groups} "
        lines = [f"kept tokens per {unit} (% of {self.tokens_per_frame}, mean over KV heads)",
                 f"{head:>10}" + "".join(f"{s:>4}" for s, _ in cols) + "   text  held"]
        for layer in range(frac.shape[0]):
            cells = "".join(f"{100 * frac[layer, s:e].mean():>4.0f}" for s, e in cols)
            text = self.text[layer].float().mean()
            held = self.held[layer].float().mean()
            lines.append(f"{'layer ' + str(layer):>10}" + cells + f"  {text:>5.0f} {held:>5.0f}")
        return "\n".join(lines)

    def plot(self, path, title: str | None = None) -> None:
        """Save a frame x layer heat map of the share of each frame's tokens held (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise TokenmemError("the kept-token plot needs matplotlib: pip install 'tokenmem[video]'") from None
        frac = self.fraction().numpy()
        fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * self.frames + 2), max(2.0, 0.35 * frac.shape[0] + 1.2)))
        image = ax.imshow(frac, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_xlabel("frame" if self.frames_per_column == 1
                      else f"temporal patch (frames {self.frames_per_column}t .. {self.frames_per_column}t + "
                           f"{self.frames_per_column - 1})")
        ax.set_ylabel("layer")
        ax.set_title(title or "share of each frame's tokens kept (mean over KV heads)")
        fig.colorbar(image, ax=ax, fraction=0.04)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
