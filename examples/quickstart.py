"""Quickstart: a bounded memory under `model.generate`, on a small local model.

Uses the demo model that `tokenmem demo` builds (random weights; a trained one is planned), so the
text is meaningless; watch the memory summary instead.

    python examples/quickstart.py [--model PATH]
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tokenmem
from tokenmem.demo import build_demo_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None)
args = parser.parse_args()
path = args.model or str(build_demo_model())

model = AutoModelForCausalLM.from_pretrained(path).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
tokenizer.padding_side = "left"
prompts = ["import os\nimport sys\n" * 200, "def main():\n    return 0\n" * 150]
enc = tokenizer(prompts, return_tensors="pt", padding=True)

for evictor in ("full", "sink", "h2o"):
    memory = tokenmem.TokenMemory(model, evictor=evictor, budget=None if evictor == "full" else 256, interval=64)
    with torch.no_grad():
        out = model.generate(**enc, past_key_values=memory, max_new_tokens=32, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    print(memory.summary())
    print("  kept positions (layer 0, row 0, head 0):", memory.layers[0].meta.position[0, 0, :8].tolist(), "...")
