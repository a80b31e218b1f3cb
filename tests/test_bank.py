"""The MemLong-style memory bank (tokenmem/bank): nothing lost, exact when everything is retrieved, identical
to the evictor alone when nothing is, bounded device memory on a 100k-token stream, spill integrity, the
least-retrieved dropping policy, and retrieval of the chunk a query matches."""

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tokenmem
from tokenmem import cache_kwargs
from conftest import Chooser, padded_batch, tiny_model, twin
from tokenmem.attention import tokenmem_attention
from tokenmem.meta import FLAGS, PAD, POSITION, ROPE, TOKEN
from tokenmem.bank import Bank, BankError
from tokenmem.plugins.namm import NAMM, NAMMConfig
from tokenmem.plugins.namm.scorer import num_params


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def namm():
    cfg = NAMMConfig(interval=16, hop=8, n_fft=16)
    return NAMM(cfg, torch.randn(num_params(cfg), generator=torch.Generator().manual_seed(0)) * 0.5)


def evictor_setup(name):
    """(evictor, TokenMemory options) with a budget that binds on a ~100-token stream."""
    if name == "namm":
        return namm(), {"budget": 24, "interval": 16}
    if name == "chooser":
        return Chooser(), {"interval": 16}
    options = {"separator_ids": [5, 6, 7, 8, 9, 10, 11, 12]} if name == "separator" else {}
    return name, {"budget": 24, "interval": 8, **options}


def record_updates(memory):
    """Wrap ``memory.update``: every key/value a layer receives, concatenated in stream order."""
    calls = {}
    update = memory.update

    def recording(key, value, layer_idx, *args, **kwargs):
        calls.setdefault(layer_idx, []).append((key.detach().clone(), value.detach().clone()))
        return update(key, value, layer_idx, *args, **kwargs)

    memory.update = recording
    return lambda i: (torch.cat([k for k, _ in calls[i]], 2), torch.cat([v for _, v in calls[i]], 2))


def stream(model, cache, ids, mask, chunk=16, decode=12, tokens=None):
    """Chunked prefill, then greedy decoding (or the given ``tokens``); returns all ids and the full mask."""
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, s : s + chunk], attention_mask=mask[:, : s + chunk], **cache_kwargs(model, cache),
                        use_cache=True)
        for step in range(decode):
            nxt = out.logits[:, -1:].argmax(-1) if tokens is None else tokens[:, step : step + 1]
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
    return ids, mask


# -- nothing lost ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,spill", [("sink", False), ("recent", False), ("separator", False), ("h2o", False),
                                        ("namm", False), ("chooser", False), ("sink", True)])
def test_cache_plus_bank_hold_every_token_exactly_once(name, spill, tmp_path):
    model = tiny_model("llama")
    reference = twin(model)
    evictor, options = evictor_setup(name)
    bank = Bank(chunk_size=8, retrieve=2, spill_dir=tmp_path if spill else None)
    memory = tokenmem.TokenMemory(model, evictor, bank=bank, **options)
    received = record_updates(memory)
    ids, mask = padded_batch(2, 96, seed=3, pad=5)
    all_ids, all_mask = stream(model, memory, ids, mask)
    assert memory.stats()["evictions"] > 0 and memory.stats()["bank"]["chunks"] > 0
    dynamic = DynamicCache()
    stream(reference, dynamic, ids, mask, tokens=all_ids[:, ids.shape[1] :])
    masked_real = 0
    for i, layer in enumerate(memory.layers):
        keys, values = received(i)  # [b, h, T, d]: what the layer was given, in stream order
        if i == 0:  # layer 0's keys depend on nothing evicted: they equal the full DynamicCache's
            torch.testing.assert_close(keys, dynamic.layers[0].keys, rtol=0, atol=1e-6)
            torch.testing.assert_close(values, dynamic.layers[0].values, rtol=0, atol=1e-6)
        meta = layer.meta
        for b in range(2):
            real = all_mask[b].nonzero()[:, 0]
            for h in range(keys.shape[1]):
                live = meta.valid[b, h]
                masked_real += int((~live & all_mask[b][meta.position[b, h]].bool()).sum())
                bk, bv, bm = memory.bank.contents(i, b, h)
                assert not bool((bm[:, FLAGS] & PAD).any()), "padding was banked"
                positions = torch.cat([meta.position[b, h][live], bm[:, POSITION]])
                order = torch.argsort(positions)
                assert torch.equal(positions[order], real), f"layer {i} row {b} head {h}: tokens lost or doubled"
                k = torch.cat([layer.keys[b, h][live], bk])[order]
                v = torch.cat([layer.values[b, h][live], bv])[order]
                assert torch.equal(k, keys[b, h, real]) and torch.equal(v, values[b, h, real])
                assert torch.equal(bm[:, TOKEN], all_ids[b, bm[:, POSITION]])  # metadata travels with the token
                assert torch.equal(bm[:, ROPE], bm[:, POSITION])  # original positions
    if name == "chooser":
        assert masked_real > 0  # ragged decisions masked real tokens, and they are in the bank exactly once


# -- equivalences ------------------------------------------------------------------------------------
def generate(model, ids, mask, cache=None, new=24):
    kwargs = {} if cache is None else cache_kwargs(model, cache)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kwargs)


def max_logit_error(a, b):
    assert len(a.logits) == len(b.logits)
    return max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits))


@pytest.fixture(scope="module")
def batch_reference():
    model = tiny_model("llama")
    ids, mask = padded_batch(2, 40, seed=1)
    return model, ids, mask, generate(model, ids, mask)


@pytest.mark.parametrize("name,options", [("sink", {}), ("h2o", {"representative": "top"}),
                                          ("sink", {"representative": "mean", "recent_queries": None}), ("namm", {}),
                                          ("recent", {"spill": True})])
def test_retrieving_every_banked_token_equals_full_attention(name, options, batch_reference, tmp_path):
    """Original positions: attending to [all banked tokens, live cache] is attending to every token."""
    model, ids, mask, ref = batch_reference
    ours = twin(model)
    evictor, kw = (namm(), {"budget": 16, "interval": 16}) if name == "namm" else (name, {"budget": 12, "interval": 4})
    spill = tmp_path if options.pop("spill", False) else None
    bank = Bank(chunk_size=4, retrieve=1000, retrieve_every=1, spill_dir=spill, **options)
    memory = tokenmem.TokenMemory(ours, evictor, bank=bank, **kw)
    out = generate(ours, ids, mask, memory)
    assert memory.stats()["bank"]["tokens"] > 40  # most of the stream went through the bank
    assert torch.equal(out.sequences, ref.sequences)
    assert max_logit_error(out, ref) < 1e-4
    alone = twin(model)
    evictor = namm() if name == "namm" else name
    without = generate(alone, ids, mask, tokenmem.TokenMemory(alone, evictor, **kw))
    assert max_logit_error(without, ref) > 0.1  # the budget binds: the equality above is the bank's doing


@pytest.mark.parametrize("name", ["sink", "namm"])
def test_retrieve_zero_is_the_evictor_alone(name, batch_reference):
    model, ids, mask, _ = batch_reference
    evictor, kw = (namm, {"budget": 16, "interval": 16}) if name == "namm" else (lambda: name, {"budget": 12, "interval": 4})
    a, b = twin(model), twin(model)
    alone = generate(a, ids, mask, tokenmem.TokenMemory(a, evictor(), **kw))
    memory = tokenmem.TokenMemory(b, evictor(), bank=Bank(chunk_size=4, retrieve=0), **kw)
    banked = generate(b, ids, mask, memory)
    assert memory.stats()["bank"]["tokens"] > 0 and memory.stats()["bank"]["refreshes"] == 0
    assert torch.equal(alone.sequences, banked.sequences)
    assert all(torch.equal(x, y) for x, y in zip(alone.logits, banked.logits))


def test_bank_with_a_budget_that_never_binds_is_the_full_cache(batch_reference):
    model, ids, mask, ref = batch_reference
    for evictor, budget in (("sink", 100), ("full", None)):
        ours = twin(model)
        memory = tokenmem.TokenMemory(ours, evictor, budget=budget, interval=4, bank=True)
        out = generate(ours, ids, mask, memory)
        assert memory.stats()["bank"]["tokens"] == 0 and memory.stats()["evictions"] == 0
        assert torch.equal(out.sequences, ref.sequences) and max_logit_error(out, ref) <= 1e-5


@pytest.mark.parametrize("placement", ["before", "zero"])
def test_shift_mode_places_retrieved_tokens_before_slot_zero_or_at_zero(placement):
    """Shift mode: the r retrieved keys are re-rotated to positions -r..-1 (default) or all to 0 (MemLong's)."""
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    raw = []
    attn.k_proj.register_forward_hook(lambda _m, _i, out: raw.append(out.view(1, out.shape[1], -1, attn.head_dim)[0]))
    memory = tokenmem.TokenMemory(model, "sink", budget=12, interval=4, positions="shift",
                                  bank=Bank(chunk_size=4, retrieve=3, retrieve_every=1, placement=placement))
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    generate(model, ids, torch.ones_like(ids), memory, new=10)
    raw = torch.cat(raw, 0).transpose(0, 1)  # [h, T, d] keys before RoPE
    active = memory.bank.layers[0].active
    assert active.all_valid and active.size == 12  # 3 chunks of 4
    for h in range(raw.shape[0]):
        pos = active.positions[0, h]
        assert torch.all(pos[1:] > pos[:-1])
        target = torch.arange(-active.size, 0) if placement == "before" else torch.zeros(active.size, dtype=torch.long)
        cos, sin = model.model.rotary_emb(raw, target[None])
        _, expected = apply_rotary_pos_emb(raw[h : h + 1, pos][None], raw[h : h + 1, pos][None], cos, sin)
        torch.testing.assert_close(active.keys[0, h], expected[0, 0], rtol=1e-5, atol=1e-5)


# -- device memory bound on a long stream --------------------------------------------------------------
def test_device_memory_bound_on_a_100k_token_stream():
    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    budget, interval, chunk, retrieve, limit = 256, 1024, 64, 4, 32
    bank = Bank(chunk_size=chunk, retrieve=retrieve, retrieve_every=4, max_chunks=limit)
    memory = tokenmem.TokenMemory(model, "sink", budget=budget, interval=interval, bank=bank)
    attended = []
    kernel = memory.kernel

    def watching(extra, query, keys, values, **kwargs):  # keys on the device in one attention call
        attended.append(keys.shape[2] + (0 if extra is None else extra.size))
        return kernel(extra, query, keys, values, **kwargs)

    memory.kernel = watching
    g = torch.Generator().manual_seed(0)
    total = 100_000
    with torch.no_grad():
        for s in range(0, total, interval):  # prefill chunks of `interval` tokens
            ids = torch.randint(3, 300, (1, min(interval, total - s)), generator=g)
            out = model(input_ids=ids, **cache_kwargs(model, memory), use_cache=True, logits_to_keep=1)
            assert max(memory.stats()["held"]) <= budget
        for _ in range(24):  # then decode steps (the retrieved set refreshed every 4)
            out = model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(model, memory), use_cache=True)
            assert max(memory.stats()["held"]) <= budget + interval - 1
    assert memory.seen == total + 24
    assert max(attended) <= budget + interval + retrieve * chunk
    assert max(attended) > budget + interval  # retrieval happened on the largest calls
    stats = memory.stats()["bank"]
    layers, streams = len(memory.layers), 1
    assert stats["chunks"] == layers * streams * limit
    assert stats["dropped_chunks"] > 1000 and stats["dropped_tokens"] == stats["dropped_chunks"] * chunk
    # every evicted token is in the bank or accounted for as dropped
    evicted = layers * memory.seen - sum(memory.stats()["held"])
    assert stats["tokens"] + stats["dropped_tokens"] == evicted
    assert stats["host_bytes"] == sum(b.host_bytes() for b in memory.bank.layers.values()) > 0
    per_token = 2 * 16 * 4 + 7 * 8  # keys + values (float32, head dim 16) + packed meta and position (int64)
    assert stats["bytes"] == stats["host_bytes"] < 2 * layers * limit * chunk * per_token
    assert len(stats["dropped"]) == 32 and len(stats["dropped"][-1]["positions"]) == chunk


# -- spill files ----------------------------------------------------------------------------------------
def spilled_memory(tmp_path):
    model = tiny_model("llama")
    memory = tokenmem.TokenMemory(model, "sink", budget=12, interval=4,
                                  bank=Bank(chunk_size=4, retrieve=1000, retrieve_every=1, spill_dir=tmp_path))
    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, **cache_kwargs(model, memory), use_cache=True)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert files and memory.stats()["bank"]["spilled_bytes"] == sum(f.stat().st_size for f in files)
    return model, memory, files


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_spill_file_raises(damage, tmp_path):
    model, memory, files = spilled_memory(tmp_path)
    path = files[0]
    data = bytearray(path.read_bytes())
    if damage == "corrupt":
        data[-3] ^= 0xFF  # a byte of the last chunk's data: the header still parses
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) - 10]))
    else:
        path.unlink()
    with pytest.raises(BankError, match="spill file") as info, torch.no_grad():
        model(torch.tensor([[5]]), **cache_kwargs(model, memory), use_cache=True)
    assert isinstance(info.value, tokenmem.TokenmemError)


def test_spilled_bank_reads_back_what_was_written(tmp_path):
    _, memory, files = spilled_memory(tmp_path)
    model = tiny_model("llama")  # the same weights as spilled_memory's model
    in_memory = tokenmem.TokenMemory(model, "sink", budget=12, interval=4,
                                     bank=Bank(chunk_size=4, retrieve=1000, retrieve_every=1))
    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, **cache_kwargs(model, in_memory), use_cache=True)
    for i in range(len(memory.layers)):
        for h in range(2):
            for a, b in zip(memory.bank.contents(i, 0, h), in_memory.bank.contents(i, 0, h)):
                assert torch.equal(a, b)
    assert memory.stats()["bank"]["host_bytes"] < in_memory.stats()["bank"]["host_bytes"]
    memory.reset()
    assert not list(tmp_path.rglob("*.safetensors"))


# -- hand-made retrieval and the dropping policy (no model: the real attention path) --------------------------
D = 8


def call(memory, index, query_dir=None):
    """Append 4 tokens with keys ``5 e_index`` and values ``index + 1``; their queries point at
    ``10 e_query_dir`` (or are zero); returns the attention output ``[4, d]``."""
    k = torch.zeros(1, 1, 4, D)
    k[..., index] = 5.0
    v = torch.full((1, 1, 4, D), float(index + 1))
    keys, values = memory.update(k, v, 0)
    q = torch.zeros(1, 1, 4, D)
    if query_dir is not None:
        q[..., query_dir] = 10.0
    out, _ = tokenmem_attention(SimpleNamespace(layer_idx=0, is_causal=True), q, keys, values, None, scaling=1.0)
    return out[0, :, 0]


def probe(memory, query_dir):
    """One decode step whose key and value are zero and whose query points at ``10 e_query_dir``."""
    keys, values = memory.update(torch.zeros(1, 1, 1, D), torch.zeros(1, 1, 1, D), 0)
    q = torch.zeros(1, 1, 1, D)
    q[..., query_dir] = 10.0
    out, _ = tokenmem_attention(SimpleNamespace(layer_idx=0, is_causal=True), q, keys, values, None, scaling=1.0)
    return out[0, 0, 0]


def test_the_chunk_a_query_matches_is_retrieved():
    outputs = {}
    for retrieve in (0, 1):
        memory = tokenmem.TokenMemory(None, "recent", budget=4, interval=4,
                                      bank=Bank(chunk_size=4, retrieve=retrieve, retrieve_every=1))
        for i in range(4):  # chunks 0, 1, 2 go to the bank; tokens of call 3 stay live
            call(memory, i)
        hits = memory.bank.layers[0].hits[0, 0].clone()
        outputs[retrieve] = probe(memory, query_dir=1)
    active = memory.bank.layers[0].active
    assert active.positions[0, 0].tolist() == [4, 5, 6, 7]  # chunk 1, the one the query points at
    assert (memory.bank.layers[0].hits[0, 0] - hits).tolist() == [0, 1, 0]
    torch.testing.assert_close(outputs[1], torch.full((D,), 2.0), rtol=0, atol=1e-3)  # chunk 1's value
    assert float((outputs[0] - 2.0).abs().min()) > 1.0  # without retrieval it is out of reach


def one_key_chunks(representative):
    """Chunk A (positions 0-3) holds one key ``6 e_1`` among three ``-2 e_1``; chunk B (4-7) four ``e_1``.
    A query along ``e_1`` matches A's one key best (6 > 1) while B has the larger mean key (1 > 0)."""
    memory = tokenmem.TokenMemory(None, "recent", budget=4, interval=4,
                                  bank=Bank(chunk_size=4, retrieve=1, retrieve_every=1, representative=representative))
    for keys, value in (([6.0, -2.0, -2.0, -2.0], 1.0), ([1.0] * 4, 2.0), ([0.0] * 4, 3.0), ([0.0] * 4, 4.0)):
        k = torch.zeros(1, 1, 4, D)
        k[0, 0, :, 1] = torch.tensor(keys)
        live_k, live_v = memory.update(k, torch.full((1, 1, 4, D), value), 0)
        tokenmem_attention(SimpleNamespace(layer_idx=0, is_causal=True), torch.zeros(1, 1, 4, D), live_k, live_v,
                           None, scaling=1.0)
    probe(memory, query_dir=1)
    return memory.bank.layers[0].active.positions[0, 0].tolist()


def test_max_scores_a_chunk_by_its_best_key_mean_by_its_mean_key():
    assert one_key_chunks("max") == [0, 1, 2, 3]
    assert one_key_chunks("mean") == [4, 5, 6, 7]


def test_max_needs_the_keys_in_host_memory(tmp_path):
    with pytest.raises(tokenmem.TokenmemError, match="host memory"):
        Bank(representative="max", spill_dir=tmp_path)
    assert Bank(spill_dir=tmp_path).representative == "mean" and Bank().representative == "max"


def test_full_stream_drops_least_retrieved_chunk_first_ties_to_oldest():
    memory = tokenmem.TokenMemory(None, "recent", budget=4, interval=4,
                                  bank=Bank(chunk_size=4, retrieve=1, retrieve_every=1, max_chunks=2))
    bank = memory.bank
    call(memory, 0)
    call(memory, 1)  # end: chunk A (positions 0-3) banked
    call(memory, 2, query_dir=0)  # retrieves A (1 hit); end: chunk B (4-7)
    call(memory, 3, query_dir=1)  # retrieves B (1 hit); end: C (8-11) arrives, A and B tie -> A (older) goes
    assert [(d.positions.tolist(), d.retrieved) for d in bank.dropped] == [([0, 1, 2, 3], 1)]
    call(memory, 4, query_dir=1)  # B: 2 hits; end: D (12-15) arrives, C (0 hits, newer than B) goes
    assert [(d.positions.tolist(), d.retrieved) for d in bank.dropped] == [([0, 1, 2, 3], 1), ([8, 9, 10, 11], 0)]
    held = sorted(bank.contents(0, 0, 0)[2][:, POSITION].tolist())
    assert held == [4, 5, 6, 7, 12, 13, 14, 15]
    stats = memory.stats()["bank"]
    assert stats["dropped_chunks"] == 2 and stats["dropped_tokens"] == 8
    assert stats["dropped"][1] == {"layer": 0, "batch": 0, "head": 0, "retrieved": 0, "positions": [8, 9, 10, 11]}


# -- batch selection, options ------------------------------------------------------------------------------
def test_batch_selection_moves_the_bank_streams():
    model = tiny_model("llama")
    memory = tokenmem.TokenMemory(model, "sink", budget=16, interval=4, bank=Bank(chunk_size=4, retrieve=2))
    ids, mask = padded_batch(2, 48, seed=2)
    stream(model, memory, ids, mask, decode=4)
    before = [memory.bank.contents(i, 1, h) for i in range(2) for h in range(2)]
    memory.batch_select_indices(torch.tensor([1]))
    after = [memory.bank.contents(i, 0, h) for i in range(2) for h in range(2)]
    for a, b in zip(before, after):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert memory.bank.layers[0].active is None  # the retrieved set is rebuilt for the new rows
    with torch.no_grad():
        model(torch.tensor([[5]]), **cache_kwargs(model, memory), use_cache=True)
    assert memory.bank.layers[0].active.keys.shape[0] == 1


def test_beam_search_reorders_the_bank():
    model = tiny_model("llama")
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(4))
    memory = tokenmem.TokenMemory(model, "sink", budget=12, interval=4, bank=Bank(chunk_size=4, retrieve=2))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, **cache_kwargs(model, memory))
    assert out.shape == (1, 48)
    assert all(b.b == 3 for b in memory.bank.layers.values())  # one stream set per beam
    for i in range(2):
        for beam in range(3):  # each beam's bank + cache still hold the prompt's tokens exactly once
            _, _, meta = memory.bank.contents(i, beam, 0)
            live = memory.layers[i].meta.position[beam, 0]
            assert sorted(meta[:, POSITION].tolist() + live.tolist())[:40] == list(range(40))


def test_bank_options_are_checked():
    for bad in ({"chunk_size": 0}, {"retrieve": -1}, {"retrieve_every": 0}, {"max_chunks": 0},
                {"representative": "median"}, {"placement": "first"}, {"recent_queries": 0}):
        with pytest.raises(tokenmem.TokenmemError):
            Bank(**bad)
    with pytest.raises(tokenmem.TokenmemError, match="bank must be"):
        tokenmem.TokenMemory(None, "sink", budget=8, bank="yes")
