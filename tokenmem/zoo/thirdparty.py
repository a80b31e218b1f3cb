"""A second held-out retrieval set, on code the shipped model never saw: ``transformers``' own Python sources.

The shipped ``stdlib-llama`` was trained on the Python standard library, and both splits of
:mod:`tokenmem.zoo.lm_tasks` are standard-library files it did not train on. This set plants the same
``_SECRET_7 = 48213`` / ``assert _SECRET_7 == `` pairs (:mod:`tokenmem.zoo.planting`, the same builder as the
``retrieval`` task, 12 prompts per distance 256 / 512 / 1,024 / 1,536) into the sources of the installed
``transformers`` package (Apache-2.0): a different code base, style (type hints, long docstrings) and vocabulary.
It is shipped as data (``data/lm_tasks/retrieval-thirdparty.jsonl``, text and token ids, with the package version
in every record) and is a held-out check only: no default is ever chosen on it.

Rebuild: ``python -m tokenmem.zoo.thirdparty`` (the files depend on the installed transformers version).
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import numpy as np

from .corpus import SourceFile
from .lm_tasks import MIN_FILE_CHARS, TASK_DIR, _retrieval

PACKAGE = "transformers"
SUBDIRS = ("", "generation", "utils", "integrations")  # the library's core, not the generated model files
SPLIT = "thirdparty"


def source_files(package: str = PACKAGE) -> list[SourceFile]:
    """The package's long ``.py`` files in :data:`SUBDIRS` (sorted by relative path)."""
    import importlib

    root = Path(importlib.import_module(package).__file__).parent
    out = []
    for sub in SUBDIRS:
        for f in sorted((root / sub).glob("*.py")):
            raw = f.read_bytes()
            text = raw.decode("utf-8", errors="replace")
            if len(text) >= MIN_FILE_CHARS:
                out.append(SourceFile(f"{package}/{f.relative_to(root).as_posix()}", text, hashlib.sha256(raw).hexdigest()))
    return out


def build(tokenizer, out_dir: Path = TASK_DIR, seed: int = 0, per_distance: int = 12) -> int:
    files = source_files()
    version = f"{PACKAGE} {metadata.version(PACKAGE)}"
    records = _retrieval(tokenizer, files, np.random.default_rng([seed, 7]), per_distance)
    for r in records:
        r["package"] = version
    path = Path(out_dir) / f"retrieval-{SPLIT}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)


def main(argv=None) -> None:
    import argparse

    from transformers import AutoTokenizer

    from . import stdlib_lm_path

    p = argparse.ArgumentParser(description="Rebuild the third-party retrieval set")
    p.add_argument("--out", default=str(TASK_DIR))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build(AutoTokenizer.from_pretrained(stdlib_lm_path()), Path(args.out), args.seed), "prompts")


if __name__ == "__main__":
    main()
