"""A model dispatched by accelerate with layers offloaded to disk generates the same tokens under a TokenMemory."""

import torch
from transformers import AutoModelForCausalLM

import tokenmem
from tokenmem import cache_kwargs
from conftest import padded_batch


def _generate(model, evictor, budget):
    ids, mask = padded_batch(2, 40, seed=7)
    memory = tokenmem.TokenMemory(model, evictor, budget=budget, interval=8)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, memory), max_new_tokens=24, do_sample=False,
                             pad_token_id=0)
    return out, memory


def test_disk_offload_gives_same_tokens(tiny_llama_dir, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, device_map=device_map, offload_folder=str(tmp_path / "offload")).eval()
    assert getattr(offloaded, "hf_device_map", {}).get("model.layers.1") == "disk"
    for model in (plain, offloaded):
        model.generation_config.eos_token_id = None
    for evictor, budget in (("full", None), ("sink", 24), ("h2o", 24)):
        a, mem_a = _generate(plain, evictor, budget)
        b, mem_b = _generate(offloaded, evictor, budget)
        assert torch.equal(a, b), evictor
        assert mem_a.stats()["held"] == mem_b.stats()["held"]
        for la, lb in zip(mem_a.layers, mem_b.layers):
            assert torch.equal(la.meta.position, lb.meta.position)
