"""Compiled kernels kept across restarts (issue 25 part 7).

The 8B shape took 43-46 s from process start to its first token, against 15 s for HF
`from_pretrained`; torch.compile (Inductor lowering, then Triton compiling every kernel) and the
first launch of our own Triton kernels are most of it, and all of it is the same work on every
start. Inductor's FX-graph and AOT-autograd caches and Triton's kernel cache skip it when they
find their files, but by default they live in /tmp, which the service's unit makes private
(PrivateTmp: emptied at every restart). `compile_cache_dir` puts them in the data directory.

One directory per key: the model's shape, the engine settings a kernel depends on, the versions
of torch, Triton and inferd, and the GPU. An upgrade or a setting change starts a new directory
instead of finding kernels built for something else. Each rank of a tensor-parallel group has
its own (no two processes write one directory).

A cache is never trusted blindly: a start that completes (weights loaded, warm-up and graph
capture done) writes a manifest of every file's digest. The next start checks it first: a file
that does not match its digest (bit rot, a disk filled mid-write, garbage) or that the manifest
does not list is removed, and only that kernel compiles again; a directory without a readable
manifest is moved aside whole and the start compiles from scratch. When the directory cannot be
used at all (not writable, a file in its place) the engine starts without a persistent cache and
says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import inferd

log = logging.getLogger("inferd.compile_cache")

MANIFEST = "manifest.json"
KEY_FILE = "key.json"
# Directories of other keys kept beside the one in use (the previous versions and settings, for a
# rollback); older ones, and directories moved aside, go.
KEEP_OTHER_KEYS = 2


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def cache_key_fields(config, model_cfg, rank: int = 0) -> dict:
    """Everything a compiled kernel may depend on."""
    device = torch.device(config.device)
    gpu = "cpu"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} sm{props.major}{props.minor}"
    settings = (
        "dtype",
        "quantization",
        "kv_cache_dtype",
        "block_size",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
        "cuda_graph_max_batch",
        "enforce_eager",
        "tensor_parallel_size",
    )
    return {
        "model": dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else repr(model_cfg),
        "settings": {k: getattr(config, k) for k in settings},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "inferd": inferd.__version__,
        "gpu": gpu,
        "rank": rank,
    }


def cache_key(fields: dict) -> str:
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST, KEY_FILE) and ".tmp" not in p.name)


class CompileCache:
    def __init__(self, directory: Path):
        self.directory = directory

    def _verify(self) -> bool:
        """Keep only the files the last completed start vouched for, unchanged. A file that
        differs from its digest (bit rot, garbage, or rewritten since) or that no manifest lists
        (written after the seal, or by a start that never completed) is removed: that kernel is
        compiled again, the rest of the cache still serves. A listed file that is gone is just a
        miss. False when there is no readable manifest to judge by."""
        try:
            listed = json.loads((self.directory / MANIFEST).read_text())["files"]
            if not isinstance(listed, dict):
                return False
            dropped = []
            for path in _files(self.directory):
                digest = listed.get(path.relative_to(self.directory).as_posix())
                if digest is None or _digest(path) != digest:
                    dropped.append(path)
                    path.unlink()
            if dropped:
                log.warning("compile cache %s: removed %d files its manifest does not vouch for", self.directory, len(dropped))
            return True
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("compile cache %s: unreadable manifest (%s)", self.directory, e)
            return False

    def _prepare(self, fields: dict) -> None:
        """Make the directory trustworthy: verified, or moved aside and started afresh."""
        d = self.directory
        fresh = d.is_dir() and not any(d.iterdir())
        if d.exists() and not fresh and not (d.is_dir() and self._verify()):
            aside = d.with_name(f"{d.name}.untrusted-{int(time.time())}")
            log.warning("compile cache %s cannot be trusted: moved to %s, compiling from scratch", d, aside)
            if d.is_dir():
                shutil.rmtree(aside, ignore_errors=True)
                d.rename(aside)
            else:
                d.unlink()
        d.mkdir(parents=True, exist_ok=True)
        (d / KEY_FILE).write_text(json.dumps(fields, sort_keys=True, indent=1, default=str))

    def activate(self) -> None:
        """Point Inductor's and Triton's caches here (before anything is compiled)."""
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.directory / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(self.directory / "triton")
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
        # Importing Inductor costs seconds (on the CPU, where nothing compiles, most of a start):
        # one not imported yet reads the environment when it is; one already imported is told.
        if "torch._inductor.config" in sys.modules:
            try:
                import torch._functorch.config as functorch_config
                import torch._inductor.config as inductor_config
                from torch._inductor.utils import clear_caches

                inductor_config.fx_graph_cache = True
                functorch_config.enable_autograd_cache = True
                clear_caches()  # paths memoised under an earlier directory
            except (ImportError, AttributeError) as e:  # an Inductor without these knobs reads the env
                log.info("compile cache: %s", e)

    def seal(self) -> None:
        """This start completed: vouch for every file now in the directory."""
        try:
            files = {p.relative_to(self.directory).as_posix(): _digest(p) for p in _files(self.directory)}
            tmp = self.directory / f"{MANIFEST}.tmp"
            tmp.write_text(json.dumps({"files": files, "sealed_at": time.time()}))
            tmp.replace(self.directory / MANIFEST)
            log.info("compile cache %s: %d files sealed", self.directory, len(files))
        except OSError as e:
            log.warning("compile cache %s: could not write its manifest (%s); the next start compiles afresh", self.directory, e)


def prune(root: Path, current: Path) -> None:
    """Remove all but the KEEP_OTHER_KEYS most recently sealed other key directories (and
    directories moved aside by earlier starts)."""
    others = [p for p in root.iterdir() if p.is_dir() and p != current]
    sealed = [p for p in others if ".untrusted-" not in p.name and (p / MANIFEST).is_file()]
    kept = sorted(sealed, key=lambda p: (p / MANIFEST).stat().st_mtime)
    for p in set(others) - set(kept[-KEEP_OTHER_KEYS:]):
        shutil.rmtree(p, ignore_errors=True)


def open_compile_cache(config, model_cfg, rank: int = 0) -> CompileCache | None:
    """The verified, activated cache directory for this engine (None: no compile_cache_dir, or
    it cannot be used: the engine then starts without a persistent cache)."""
    if not config.compile_cache_dir:
        return None
    fields = cache_key_fields(config, model_cfg, rank)
    cache = CompileCache(Path(config.compile_cache_dir) / cache_key(fields))
    try:
        if cache.directory.parent.is_dir():
            prune(cache.directory.parent, cache.directory)  # first: a directory this start moves aside stays to be looked at
        cache._prepare(fields)
    except OSError as e:
        log.warning(
            "compile_cache_dir %s cannot be used (%s): starting without a persistent compile cache; make it a writable directory",
            config.compile_cache_dir,
            e,
        )
        return None
    cache.activate()
    log.info("compile cache: %s", cache.directory)
    return cache
