"""Zero-shot transfer across language, video and RL: every evictor at 25% / 50% KV, NAMM with the language-trained
scorer unchanged. The same as ``tokenmem bench``; see :mod:`tokenmem.zoo.transfer` for what is measured.

    python benchmarks/transfer.py                     # full run (about an hour on 2 cores)
    python benchmarks/transfer.py --quick             # <= 10 minutes
    python benchmarks/transfer.py --out benchmarks/results/transfer --readme README.md
"""

import sys

from tokenmem.errors import TokenmemError
from tokenmem.zoo.transfer import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except TokenmemError as exc:
        print(f"transfer: error: {exc}", file=sys.stderr)
        sys.exit(2)
