"""Quickstart: a bounded memory under `model.generate`, on a small local model.

Uses the language model tokenmem trains and ships (``tokenmem/zoo/models/stdlib-llama``, a 4.7 M-parameter
Llama trained on the Python standard library), loaded with the real ``from_pretrained``.

    python examples/quickstart.py [--model PATH]
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tokenmem
from tokenmem.zoo import stdlib_lm_path

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None)
args = parser.parse_args()
path = args.model or str(stdlib_lm_path())

model = AutoModelForCausalLM.from_pretrained(path).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
tokenizer.padding_side = "left"
prompts = ["import os\nimport sys\n" * 200, "def main():\n    return 0\n" * 150]
enc = tokenizer(prompts, return_tensors="pt", padding=True)

for evictor in ("full", "sink", "h2o"):
    memory = tokenmem.TokenMemory(model, evictor=evictor, budget=None if evictor == "full" else 256, interval=64)
    with torch.no_grad():
        out = model.generate(**enc, **tokenmem.cache_kwargs(model, memory), max_new_tokens=32, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    print(memory.summary())
    print("  continuation of prompt 2:", repr(tokenizer.decode(out[1, enc.input_ids.shape[1]:], skip_special_tokens=True)))
    print("  kept positions (layer 0, row 0, head 0):", memory.layers[0].meta.position[0, 0, :8].tolist(), "...")
