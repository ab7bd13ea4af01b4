"""Why speculative greedy output can differ from plain decoding on the GPU: for the positions a
verify pass computes (k + 1 decode rows of one sequence), the logits of that pass against those of
the 1-row decode step plain decoding would take at each position, in the same cache; and plain
decoding run twice in fresh engines (is it deterministic?). Random weights in a shape, as
bench_spec.py builds them, with CUDA graphs; the rows are compared with the batch-1 GEMV kernels
(the engine's default) and without them (`fused_gemv=False`: cuBLAS at every size).

    python runtime/bench/spec_exactness.py --out $OUT/exactness.json           # one H200, ~1 min
    python runtime/bench/spec_exactness.py --device cpu --shape tiny --text-tokens 100 --steps 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import SHAPES  # noqa: E402
from bench_spec import build, edit_prompt, write_config  # noqa: E402

from inferd import SamplingParams  # noqa: E402
from inferd.engine import speculative  # noqa: E402
from inferd.engine.speculative import Chunk  # noqa: E402


def plain_output(args, target: Path, prompt: list[int]) -> list[int]:
    engine = build(args, target, target, None)
    try:
        engine.add_request(prompt, SamplingParams(max_tokens=args.steps * (args.k + 1), temperature=0.0, ignore_eos=True))
        done = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                done = out if out.finished else done
        return done.token_ids
    finally:
        engine.close()


def compare_rows(args, target: Path, prompt: list[int], oracle: list[int], gemv: bool) -> dict:
    """Forced verify passes (drafts = the plain output) and, for each of their rows, the 1-row step;
    `gemv`: the engine's batch-1 GEMV kernels where they apply (CUDA, bf16), else cuBLAS alone."""
    args.fused_gemv = gemv
    engine = build(args, target, target, "ngram")
    runner, spec = engine.runner, engine.spec
    stats = {"rows": 0, "bitwise_equal": 0, "argmax_differs": 0, "max_abs_diff": 0.0, "max_logit": 0.0}
    real_verify = speculative.verify

    def draft(batch, ks, sampler):
        return [[oracle[min(s.num_output_tokens + j, len(oracle) - 1)] for j in range(k)] for s, k in zip(batch, ks)], None

    def verify(logits, seqs, drafts, qs, sampler):
        for s, d in zip(seqs, drafts):
            tokens = s.token_ids + d
            for j in range(len(d) + 1):
                one = runner.step_logits([Chunk(tokens[: len(s) + j], s.block_table, len(s) + j - 1, 1)], is_prefill=False)[0]
                row = logits[j].to(one.dtype)
                stats["rows"] += 1
                stats["bitwise_equal"] += int(torch.equal(one, row))
                stats["argmax_differs"] += int(one.argmax().item() != row.argmax().item())
                stats["max_abs_diff"] = max(stats["max_abs_diff"], (one.float() - row.float()).abs().max().item())
                stats["max_logit"] = max(stats["max_logit"], one.float().abs().max().item())
        return real_verify(logits, seqs, drafts, qs, sampler)

    spec._draft, spec.wants = draft, (lambda seqs: True)
    speculative.verify = verify
    try:
        engine.add_request(prompt, SamplingParams(max_tokens=args.steps * (args.k + 1), temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        speculative.verify = real_verify
        engine.close()
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="qwen-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--text-tokens", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=12, help="verify passes compared")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    args.new_tokens = args.steps * (args.k + 1)
    prompt = edit_prompt(SHAPES[args.shape]["vocab_size"], args.text_tokens)
    result = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "k": args.k}
    with tempfile.TemporaryDirectory() as tmp:
        target = write_config(SHAPES[args.shape], Path(tmp) / "target")
        first, second = plain_output(args, target, prompt), plain_output(args, target, prompt)
        result["plain_deterministic"] = first == second
        result["plain_first_difference"] = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), None)
        result["gemv_kernels"] = compare_rows(args, target, prompt, first, gemv=True)
        result["plain_kernels"] = compare_rows(args, target, prompt, first, gemv=False)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
