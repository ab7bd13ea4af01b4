"""Greedy tokens of several float32 CUDA engines built one after another in one process, against
the CPU engine: how the pinned stager's missing stream wait (fixed in loader.py) was found.
Each row: variant, repetition, and per departing sequence (index, first differing output token,
its position, GPU token, CPU token), for two generate calls on the same engine.

    python runtime/bench/repro_second_engine.py normal,eager,no_overlap 4   # on the GPU machine
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inferd import LLM, SamplingParams  # noqa: E402
from inferd.testing import make_model  # noqa: E402


def departures(got, want, prompts):
    out = []
    for i, (g, c) in enumerate(zip(got, want)):
        if g != c:
            j = next(k for k in range(len(c)) if g[k] != c[k])
            out.append((i, j, len(prompts[i]) + j, g[j], c[j]))
    return out


def main() -> None:
    variants = sys.argv[1].split(",") if len(sys.argv) > 1 else ["normal", "eager", "no_overlap"]
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    path = tempfile.mkdtemp()
    make_model(path, arch="llama", heads=4, kv_heads=2)
    prompts = [list(range(3 + i, 10 + 9 * i)) for i in range(6)]
    params = [SamplingParams(max_tokens=8 + 6 * i, temperature=0.0, ignore_eos=True) for i in range(6)]
    cpu = [o.token_ids for o in LLM(path, device="cpu", dtype="float32").generate(prompts, params)]
    rows = []
    for variant in variants:
        for rep in range(reps):
            eager = variant == "eager"
            llm = LLM(path, device="cuda", dtype="float32", cuda_graph_max_batch=4, kv_cache_fraction=0.3, enforce_eager=eager)
            if variant == "no_overlap":
                llm.engine._needs_host_tokens = lambda: True  # every step waits for the last one's tokens
            if variant == "one_at_a_time":
                first = [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
            else:
                first = [o.token_ids for o in llm.generate(prompts, params)]
            second = [o.token_ids for o in llm.generate(prompts, params)]
            row = dict(variant=variant, rep=rep, first=departures(first, cpu, prompts), second=departures(second, cpu, prompts))
            rows.append(row)
            print(row, flush=True)
            del llm
            torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"second_engine_{os.environ.get('TAG', 'run')}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
