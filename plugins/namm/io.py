"""NAMM scorer files: ``<path>/scorer.safetensors`` (parameters + normalisation buffers) and
``<path>/scorer.json`` (format version, feature settings, parameter layout, and the SHA-256 of the
safetensors file, so a damaged or swapped weights file is refused by name; scorers saved before the
checksum existed load unchecked)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from tokenmem.errors import CorruptFileError, TokenmemError

from .config import NAMMConfig
from .scorer import layout, num_params

FORMAT = "tokenmem-namm-scorer"
FORMAT_VERSION = 1


def write_scorer(path, cfg: NAMMConfig, params, norm_mean, norm_var) -> None:
    """Write a scorer directory: the parameter vector and normalisation buffers, and the config."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({"params": params.contiguous().float(), "norm_mean": norm_mean.contiguous().float(),
               "norm_var": norm_var.contiguous().float()}, str(path / "scorer.safetensors"))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
            "num_params": num_params(cfg), "layout": [[name, list(shape)] for name, shape in layout(cfg)],
            "sha256": _sha256(path / "scorer.safetensors")}
    (path / "scorer.json").write_text(json.dumps(meta, indent=2) + "\n")


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def read_scorer(path):
    """``(config, params, norm_mean, norm_var)`` of a scorer directory, checked against its config."""
    path = Path(path)
    meta_file, weights_file = path / "scorer.json", path / "scorer.safetensors"
    if not meta_file.is_file() or not weights_file.is_file():
        raise TokenmemError(f"{path} is not a NAMM scorer directory: expected scorer.json and scorer.safetensors")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{meta_file} is not valid JSON ({exc}); the scorer file is corrupt: save the "
                               "scorer again or restore a copy", meta_file) from exc
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{meta_file} does not hold a JSON object; the scorer file is corrupt", meta_file)
    if meta.get("format") != FORMAT:
        raise TokenmemError(f"{meta_file} is not a tokenmem NAMM scorer (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TokenmemError(
            f"{meta_file} has format version {meta.get('format_version')}, this tokenmem reads version "
            f"{FORMAT_VERSION}; upgrade tokenmem or re-save the scorer"
        )
    cfg = NAMMConfig.from_dict(meta["config"])
    expected_layout = [[name, list(shape)] for name, shape in layout(cfg)]
    if meta.get("layout") != expected_layout:
        raise TokenmemError(f"{meta_file}: parameter layout {meta.get('layout')} does not match {expected_layout}")
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise CorruptFileError(f"cannot read {weights_file}: {exc}; the file is truncated or corrupt: save the "
                               "scorer again or restore a copy", weights_file) from exc
    if "sha256" in meta and _sha256(weights_file) != meta["sha256"]:
        raise CorruptFileError(f"{weights_file} does not match the SHA-256 recorded in {meta_file}: the weights file "
                               "is damaged or was replaced without its scorer.json; save the scorer again (both files "
                               "together) or restore a copy", weights_file)
    shapes = {"params": (num_params(cfg),), "norm_mean": (cfg.bins,), "norm_var": (cfg.bins,)}
    for name, shape in shapes.items():
        if name not in tensors:
            raise TokenmemError(f"{weights_file} lacks the tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise TokenmemError(
                f"{weights_file}: {name} has shape {tuple(tensors[name].shape)}, the config needs {shape}"
            )
    return cfg, tensors["params"], tensors["norm_mean"], tensors["norm_var"]
