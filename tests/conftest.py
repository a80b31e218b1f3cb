"""Shared fixtures: tiny random models of each tested family, built from configs (nothing downloaded)."""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from pathlib import Path

# No GPU here or in CI: Triton kernels run in Triton's interpreter on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import settings

import tokenmem

settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

VOCAB = 320


def tiny_config(family: str, **overrides):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                  bos_token_id=1, eos_token_id=None, pad_token_id=0)
    if family == "llama":
        cfg = LlamaConfig(**common)
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        cfg = Qwen2Config(**{**common, "num_key_value_heads": 1})
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=8192,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, seed: int = 0, attn: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    # random weights are small: scale up so attention is peaked and greedy decoding is not tie-prone
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def twin(model):
    """An independent copy with the same weights (tokenmem switches the attention of the model it prepares)."""
    return copy.deepcopy(model)


@pytest.fixture(params=["llama", "mistral", "qwen2", "gpt2"])
def family(request):
    return request.param


def padded_batch(batch: int, length: int, seed: int = 0, pad: int = 5):
    """Random prompts, left-padded: row i > 0 has ``pad * i`` padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, batch):
        mask[i, : pad * i] = 0
        ids[i, : pad * i] = 0
    return ids, mask


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained offline on a few sentences, saved as a transformers fast tokenizer."""
    from tokenmem.zoo.tokenizer import train_byte_bpe

    text = [
        "def add(a, b):\n    return a + b\n",
        "Hello, world. How are you? Fine! Thanks; see: this is a test.\n",
        "The quick brown fox jumps over the lazy dog. The end, again.\n",
        "for i in range(10):\n\tprint(i, i * i)\n",
    ] * 20
    fast = train_byte_bpe(text, vocab_size=VOCAB - 8)
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Llama + tokenizer saved with save_pretrained (loaded back through the real from_pretrained)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("llama")
    model = tiny_model("llama")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(path)
    return str(path)



class Chooser(tokenmem.Evictor):
    """A threshold evictor whose decisions differ per head (ragged): head 0 keeps even positions, head 1
    multiples of 3, so the memory masks the surplus slots of head 1."""

    name = "chooser"
    threshold = 0.0

    def score(self, view):
        pos = view.meta.position
        keep = torch.stack([pos[:, 0] % 2 == 0, pos[:, 1] % 3 == 0], dim=1)
        return torch.where(keep, 1.0, -1.0)

    def protect(self, view):
        return view.newest(1)


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(get):
    """A setting's value, or why it could not be read (an attribute this torch lacks; mixed precision APIs)."""
    try:
        return get()
    except (AttributeError, RuntimeError) as exc:
        return f"unreadable: {type(exc).__name__}"


def torch_global_state() -> dict:
    """The process-wide torch settings a test could leave changed for the tests after it (results of later tests
    would then depend on the order they run in): default dtype, grad / inference mode, CPU autocast, float32
    matmul precision (``"medium"`` lets oneDNN multiply float32 in bfloat16 on CPUs with AMX / AVX512-BF16),
    deterministic algorithms, oneDNN and the number of threads."""
    mkldnn = torch.backends.mkldnn
    return {
        "default dtype": torch.get_default_dtype(),
        "grad enabled": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "cpu autocast": (torch.is_autocast_enabled("cpu"), _read(lambda: torch.get_autocast_dtype("cpu"))),
        "float32 matmul precision": _read(torch.get_float32_matmul_precision),
        "fp32 precision": tuple(_read(lambda: functools.reduce(getattr, path.split("."), torch))
                                for path in PRECISION_PATHS),
        "deterministic algorithms": (torch.are_deterministic_algorithms_enabled(),
                                     torch.is_deterministic_algorithms_warn_only_enabled(),
                                     _read(lambda: torch.utils.deterministic.fill_uninitialized_memory)),
        "mkldnn": (mkldnn.enabled, _read(lambda: mkldnn.deterministic), _read(lambda: mkldnn.allow_tf32)),
        "threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
    }


@pytest.fixture(autouse=True)
def torch_state_unchanged(request):
    """Fails the test that leaves torch's process-wide state changed: every later test would run under it. The
    thread count is put back instead: the trainers' and benchmarks' ``main`` set it for their process by design
    (``--threads``), and a test that calls one would otherwise run every later test on one thread. After a
    failure the settings that can be set are put back too, so that only the test that changed them fails."""
    before = torch_global_state()
    yield
    if torch.get_num_threads() != before["threads"][0]:
        torch.set_num_threads(before["threads"][0])
    after = torch_global_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if changed:
        torch.set_default_dtype(before["default dtype"])
        torch.set_grad_enabled(before["grad enabled"])
        if not before["float32 matmul precision"].startswith("unreadable"):
            torch.set_float32_matmul_precision(before["float32 matmul precision"])
        set_precisions(before["fp32 precision"])
        deterministic, warn_only, _ = before["deterministic algorithms"]
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.mkldnn.enabled = before["mkldnn"][0]
    assert not changed, f"{request.node.nodeid} left torch's global state changed (before, after): {changed}"



PRECISION_PATHS = ("backends.fp32_precision", "backends.mkldnn.matmul.fp32_precision",
                   "backends.mkldnn.conv.fp32_precision", "backends.mkldnn.rnn.fp32_precision",
                   "backends.cuda.matmul.fp32_precision")  # under torch; the snapshot's "fp32 precision", in order


def set_precisions(values) -> None:
    """Set the settings of :data:`PRECISION_PATHS` to ``values`` (a snapshot's "fp32 precision"), skipping the
    ones this torch could not read."""
    for path, value in zip(PRECISION_PATHS, values):
        if not str(value).startswith("unreadable"):
            *parents, name = path.split(".")
            setattr(functools.reduce(getattr, parents, torch), name, value)
