"""Moved: the memory bank is :mod:`tokenmem.bank` (it is part of the memory, not an evictor). This name keeps
old imports (``from tokenmem.plugins.bank import Bank``) working."""

from tokenmem.bank import Bank, BankError, DroppedChunk, MemoryBank, Retrieved, make_bank  # noqa: F401

__all__ = ["Bank", "BankError", "DroppedChunk", "MemoryBank", "Retrieved", "make_bank"]
