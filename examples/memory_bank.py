"""Memory bank: evicted tokens kept off-device and retrieved back (MemLong-style, training-free).

The shipped standard-library Llama reads a held-out file with a value planted near its start
(``_SECRET_7 = 48213``), 1,000+ tokens of code, then ``assert _SECRET_7 == ``. With a 25% budget the
``sink`` evictor alone has evicted the value; with ``bank=True`` the evicted tokens wait in host memory
in 64-token chunks and the chunks that best match the newest queries come back into attention.

    python examples/memory_bank.py [--distance 1024] [--budget 0.25]
"""

import argparse
import tempfile

import tokenmem
from tokenmem.bank import Bank
from tokenmem.zoo.lm_tasks import RetrievalTask, retrieved_value

parser = argparse.ArgumentParser()
parser.add_argument("--distance", type=int, default=1024, choices=(256, 512, 1024, 1536))
parser.add_argument("--budget", type=float, default=0.25)
args = parser.parse_args()

task = RetrievalTask(split="eval", distances=(args.distance,), per_distance=1)
model = task.load_model()
record = task.records[0]
print(f"prompt: {len(record['input_ids'])} tokens, value set {record['measured_distance']} tokens back, truth {record['answer']}")

spill = tempfile.mkdtemp(prefix="tokenmem-bank-")
for label, bank in (("sink", None), ("sink + bank", Bank()),
                    ("sink + bank spilled to disk", Bank(spill_dir=spill))):  # a spill uses 'mean' representatives
    memory = tokenmem.TokenMemory(model, "sink", budget=args.budget, bank=bank)
    out = task.run(model, lambda: memory)[0]  # chunked prefill (128 tokens), eviction after every chunk, greedy
    answer = retrieved_value(task.decoded([out])[0])
    stats = memory.stats()
    line = (f"{label:28s} answer {answer or '-':>6s} ({'ok' if answer == record['answer'] else 'wrong'}), "
            f"held {max(stats['held'])} tokens per layer")
    if "bank" in stats:
        b = stats["bank"]
        line += (f"; bank: {b['chunks']} chunks + {b['pending']} pending tokens, {b['host_bytes'] / 2**20:.2f} MiB in "
                 f"host memory, {b['spilled_bytes'] / 2**20:.2f} MiB on disk")
    print(line)
    memory.reset()  # releases the bank (and deletes its spill files)
