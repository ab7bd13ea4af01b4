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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import SHAPES  # noqa: E402
from bench_spec import build, edit_prompt, write_config  # noqa: E402

from inferd import SamplingParams  # noqa: E402
from inferd.engine import speculative  # noqa: E402
from inferd.engine.speculative import Chunk  # noqa: E402
from inferd.testing import compare_verify_rows, force_drafts  # noqa: E402


def greedy_output(args, target: Path, prompt: list[int], method: str | None = None) -> tuple[list[int], float]:
    """Greedy output of the engine (the batch-1 GEMV kernels), plainly or with `method` as it runs
    (prompt lookup drafting while a match is found), and the acceptance rate."""
    args.fused_gemv = True
    engine = build(args, target, target, method)
    try:
        engine.add_request(prompt, SamplingParams(max_tokens=args.steps * (args.k + 1), temperature=0.0, ignore_eos=True))
        done = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                done = out if out.finished else done
        stats = engine.stats()
        return done.token_ids, stats.spec_accepted_tokens / max(1, stats.spec_draft_tokens)
    finally:
        engine.close()


def compare_rows(args, target: Path, prompt: list[int], oracle: list[int], gemv: bool) -> dict:
    """Forced verify passes (drafts = the plain output) and, for each of their rows, the 1-row step;
    `gemv`: the engine's batch-1 GEMV kernels where they apply (CUDA, bf16), else cuBLAS alone."""
    args.fused_gemv = gemv
    engine = build(args, target, target, "ngram")
    try:
        stats = compare_verify_rows(engine, prompt, oracle, args.steps * (args.k + 1))
        stats["verify_graphs"] = sorted(engine.runner.verify_graphs)
        return stats
    finally:
        engine.close()


def time_passes(args, target: Path, prompt: list[int], oracle: list[int], repeats: int = 50) -> dict:
    """Milliseconds (host to host, the graphs replayed) of one 1-row decode step and of a verify
    pass of k + 1 rows of one sequence, its rows computed as one (the verify graphs) and as a
    plain decode batch (the padded batch graph), at the position the first verify pass reaches."""
    import time

    args.fused_gemv = True
    engine = build(args, target, target, "ngram")
    runner, spec = engine.runner, engine.spec
    times = {}
    real_verify = speculative.verify

    def verify(logits, seqs, drafts, qs, sampler):
        if not times:
            s, d = seqs[0], drafts[0]
            tokens = s.token_ids + d
            rows = [Chunk(tokens[: len(s) + j], s.block_table, len(s) + j - 1, 1) for j in range(len(d) + 1)]
            passes = (("step_1_row", rows[:1], False), ("verify_as_one", rows, True), ("verify_batch", rows, False))
            for name, views, as_one in passes:
                runner.step_logits(views, is_prefill=False, as_one=as_one)
                start = time.perf_counter()
                for _ in range(repeats):
                    runner.step_logits(views, is_prefill=False, as_one=as_one)
                times[name + "_ms"] = (time.perf_counter() - start) / repeats * 1e3
            times["rows"] = len(rows)
        return real_verify(logits, seqs, drafts, qs, sampler)

    force_drafts(spec, oracle)
    speculative.verify = verify
    try:
        engine.add_request(prompt, SamplingParams(max_tokens=2 * (args.k + 1), temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        speculative.verify = real_verify
        engine.close()
    return times


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
        first, second = greedy_output(args, target, prompt)[0], greedy_output(args, target, prompt)[0]
        result["plain_deterministic"] = first == second
        result["plain_first_difference"] = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), None)
        result["gemv_kernels"] = compare_rows(args, target, prompt, first, gemv=True)
        result["plain_kernels"] = compare_rows(args, target, prompt, first, gemv=False)
        output, acceptance = greedy_output(args, target, prompt, "ngram")
        result["prompt_lookup_output_equals_plain"] = output == first
        result["prompt_lookup_first_difference"] = next((i for i, (a, b) in enumerate(zip(first, output)) if a != b), None)
        result["prompt_lookup_acceptance"] = acceptance
        if args.device == "cuda":
            result["timing"] = time_passes(args, target, prompt, first)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
