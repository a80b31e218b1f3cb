"""The second held-out retrieval set: planted values in transformers' own sources, shipped as data."""

from __future__ import annotations

import pytest

from tokenmem.errors import TokenmemError
from tokenmem.zoo import planting
from tokenmem.zoo.lm_tasks import RetrievalTask, load_records


def test_the_thirdparty_set_is_shipped_balanced_and_planted_in_its_text():
    records = load_records("retrieval", "thirdparty")
    assert len(records) == 48
    assert {r["distance"] for r in records} == {256, 512, 1024, 1536}
    assert all(r["package"].startswith("transformers ") for r in records)
    for r in records:
        name = r["text"].rsplit("assert ", 1)[1].split(" ==")[0]
        assert planting.definition(name, r["answer"]) in r["text"]  # the value is in the prompt, once defined
        assert r["text"].endswith(planting.query_prefix(name))
    task = RetrievalTask(split="thirdparty", per_distance=2)
    assert len(task.prompts) == 8


def test_other_tasks_have_no_thirdparty_split():
    with pytest.raises(TokenmemError, match="thirdparty"):
        from tokenmem.zoo.lm_tasks import CodeCompletionTask

        CodeCompletionTask(split="thirdparty")
