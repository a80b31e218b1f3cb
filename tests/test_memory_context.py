"""A memory's state is its own: several memories share one loaded model (interleaved, or in threads) and each
gives exactly what it gives alone."""

from __future__ import annotations

import threading

import pytest
import torch

import tokenmem
from tokenmem import cache_kwargs
from conftest import VOCAB, tiny_model, twin

CHUNK, CHUNKS, DECODE = 16, 6, 12


def _prompt(seed: int, length: int = CHUNK * CHUNKS) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=g)


class Stream:
    """One memory fed a prompt chunk by chunk, then greedy decode steps; ``step()`` runs one forward call."""

    def __init__(self, model, memory, ids):
        self.model, self.memory, self.ids = model, memory, ids
        self.logits: list[torch.Tensor] = []
        self.calls = [(s, s + CHUNK) for s in range(0, ids.shape[1], CHUNK)] + [None] * DECODE
        self.next = None

    @torch.no_grad()
    def step(self) -> None:
        span = self.calls.pop(0)
        tokens = self.ids[:, span[0]:span[1]] if span is not None else self.next
        out = self.model(input_ids=tokens, **cache_kwargs(self.model, self.memory), use_cache=True)
        self.logits.append(out.logits)
        self.next = out.logits[:, -1:].argmax(-1)

    def run(self) -> "Stream":
        while self.calls:
            self.step()
        return self


def _separator_memory(model, separators):
    return tokenmem.TokenMemory(model, "separator", budget=40, interval=4, separator_ids=separators, n_recent=8)


def test_two_separator_memories_interleaved_on_one_model_equal_each_alone():
    model = tiny_model("llama")
    seps = {"a": list(range(3, 60)), "b": list(range(200, 300))}
    prompts = {"a": _prompt(1), "b": _prompt(2)}
    alone = {k: Stream(model, _separator_memory(model, seps[k]), prompts[k]).run() for k in seps}
    together = {k: Stream(model, _separator_memory(model, seps[k]), prompts[k]) for k in seps}
    while together["a"].calls:
        together["a"].step()
        together["b"].step()
    for k in seps:
        assert len(alone[k].logits) == len(together[k].logits) == CHUNKS + DECODE
        for x, y in zip(alone[k].logits, together[k].logits):
            assert torch.equal(x, y)
        assert alone[k].memory.stats()["evictions"] > 0  # the budget binds: separators decide what stays
        held = together[k].memory.layers[0].meta
        flagged = set(held.token[held.is_separator].tolist())
        assert flagged and flagged <= set(seps[k])  # each memory flags its own separators only
    assert torch.equal(together["a"].memory.separator_ids, torch.tensor(seps["a"]))


def test_memories_on_one_model_keep_their_own_options():
    """A memory created later (another evictor, no separator ids) changes nothing for an earlier one."""
    model = tiny_model("llama")
    ids = _prompt(3)
    alone = Stream(model, _separator_memory(model, [5, 6, 7, 8]), ids).run()
    first = Stream(model, _separator_memory(model, [5, 6, 7, 8]), ids)
    other = Stream(model, tokenmem.TokenMemory(model, "h2o", budget=30, interval=4), _prompt(4))
    while first.calls:
        first.step()
        other.step()
    assert all(torch.equal(x, y) for x, y in zip(alone.logits, first.logits))
    assert other.memory.separator_ids is None
    assert not bool(other.memory.layers[0].meta.is_separator.any())


@pytest.mark.parametrize("shared", [False, True], ids=["model-per-thread", "one-shared-model"])
def test_memories_in_two_threads(shared):
    """Two threads, each driving its own memory (on its own copy of the model, or on one shared model), step by
    step at the same time: each gives exactly its single-threaded logits."""
    base = tiny_model("llama")
    models = [twin(base), twin(base)]
    if shared:
        models = [models[0], models[0]]
    makers = [lambda m: _separator_memory(m, list(range(3, 80))),
              lambda m: tokenmem.TokenMemory(m, "h2o", budget=30, interval=4)]
    prompts = [_prompt(5), _prompt(6)]
    reference = []
    for make, prompt in zip(makers, prompts):
        solo = twin(base)
        reference.append(Stream(solo, make(solo), prompt).run().logits)
    streams = [Stream(m, make(m), p) for m, make, p in zip(models, makers, prompts)]
    barrier, errors = threading.Barrier(2), []

    def drive(stream):
        try:
            while stream.calls:
                barrier.wait(timeout=60)  # both threads run each call at the same time
                stream.step()
        except Exception as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=drive, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for stream, ref in zip(streams, reference):
        assert len(stream.logits) == len(ref)
        assert all(torch.equal(x, y) for x, y in zip(stream.logits, ref))
