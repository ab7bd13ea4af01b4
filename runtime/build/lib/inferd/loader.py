"""Load checkpoint tensors into a model: a loop over tensors, each parameter loading itself."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from inferd.layers.linear import default_weight_loader


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"the safetensors index lists files that are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    mapping: dict = getattr(model, "packed_modules_mapping", {})
    ignored = getattr(model, "ignored_checkpoint_tensors", ())
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set(dict(model.named_parameters()))
    loaded: set[str] = set()
    for name, tensor in tensors:
        if any(name.endswith(s) for s in ignored):
            continue
        shard_id = None
        target = name
        for fragment, (fused, shard) in mapping.items():
            if f".{fragment}." in name:
                target, shard_id = name.replace(f".{fragment}.", f".{fused}."), shard
                break
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} matches no model parameter: is this the right architecture?")
        loader = getattr(param, "weight_loader", None)
        try:
            if loader is None:
                default_weight_loader(param, tensor)
            elif shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {name!r}: {e}") from None
        loaded.add(target)
    # A tied lm_head shares the embedding's parameter and is not in the checkpoint.
    aliases = {n for n, p in params.items() if n not in expected}
    missing = sorted(expected - loaded - aliases)
    if missing:
        raise ValueError(f"checkpoint lacks tensors for: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
