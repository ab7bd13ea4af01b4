"""The latent MLA decode kernels (layers/mla_decode.py) on one GPU, in one run of about 3 minutes:
the narrow kernel (blocks of 16-32 heads, today's default below 64 heads) against the wide one
(64 heads a program, FlashMLA's structure) at 16 / 64 / 128 heads x batch 1 / 16 / 64 x contexts
1k / 4k / 16k, the wide one in each launch of WIDE_CANDIDATES (an autotune-style sweep). Each
launch is captured in a CUDA graph as the engine runs it, checked against mla_decode_reference, and
reported as GB/s over the bytes it must move (every context's latent cache, the queries, the
output) and TFLOP/s over its flops (scores over 576 and p @ c over 512 per head and token).
FlashMLA publishes ~3,000 GB/s memory-bound and ~580-660 TFLOP/s bf16 compute-bound on an H800.

The results end with "table": the winning wide launch per batch bucket (over 64 and 128 heads and
the three contexts) in the exact form of mla_decode.WIDE_CONFIGS, and the head count from which the
wide kernel beat the narrow one (WIDE_MIN_HEADS): paste both into layers/mla_decode.py.

    PYTHONPATH=$PWD/runtime python3 runtime/bench/bench_mla.py --out $OUT/mla.json   # GPU machine
    PYTHONPATH=$PWD/runtime python3 runtime/bench/bench_mla.py --heads 128 --batches 64 --contexts 4096

Writes the JSON after every case, so a run stopped by its time limit keeps what it measured; past
--budget-s only the two default launches of each remaining case are timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inferd.layers import mla_decode as mla  # noqa: E402

KV_LORA, ROPE = 512, 64
SCALE = (128 + 64) ** -0.5  # V2/V3's qk_head_dim
_BASE = dict(num_warps=8, num_stages=2, halves=1, waves=1, max_splits=32)
# The sweep: ptxas (sm_90a) fits all of these within 227 KB of shared memory; block_n 64 spills
# 4-52 bytes a thread, 32 and 16 none (test_mla_wide_kernel_compiles_for_hopper_...).
WIDE_CANDIDATES = [
    _BASE | dict(block_n=64),  # FlashMLA's tile: 64 heads x 64 tokens
    _BASE | dict(block_n=64, halves=2),
    _BASE | dict(block_n=32),
    _BASE | dict(block_n=32, num_stages=3),
    _BASE | dict(block_n=32, num_stages=3, halves=2),
    _BASE | dict(block_n=16, num_stages=3),
    _BASE | dict(block_n=64, max_splits=16),  # fewer: at batch 1 each split's partials (128 KB) rival its tiles
    _BASE | dict(block_n=64, waves=2, max_splits=64),  # more splits for small batches
    _BASE | dict(block_n=32, num_stages=3, waves=2, max_splits=64),
]
# The narrow kernel as it runs today, and at 64 heads a program (which also reaches wgmma, with
# the launch heuristics of the narrow kernel).
NARROW_CANDIDATES = [{}, dict(block_h=64, tile=64)]
TOLERANCE = 2e-2  # of the reference's largest value: bf16 inputs, probabilities rounded to bf16


def latent_case(batch: int, heads: int, ctx: int, block_size: int, seed: int) -> tuple:
    """mla_decode's arguments: every sequence at `ctx` tokens, its pages scattered over the cache."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages = -(-ctx // block_size)
    cache = torch.randn(batch * pages + 1, block_size, KV_LORA + ROPE, device="cuda", dtype=torch.bfloat16, generator=g)
    tables = torch.randperm(batch * pages, device="cuda", dtype=torch.int32, generator=g).view(batch, pages)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q_latent = torch.randn(batch, heads, KV_LORA, device="cuda", dtype=torch.bfloat16, generator=g)
    q_rope = torch.randn(batch, heads, ROPE, device="cuda", dtype=torch.bfloat16, generator=g)
    return q_latent, q_rope, cache, tables, lens, SCALE


def reference(case: tuple) -> torch.Tensor:
    """mla_decode_reference a sequence at a time (its float32 copy of a 64 x 16k batch is 2.4 GB)."""
    q_latent, q_rope, cache, tables, lens, scale = case
    parts = []
    for b in range(len(lens)):
        one = slice(b, b + 1)
        parts.append(mla.mla_decode_reference(q_latent[one], q_rope[one], cache, tables[one], lens[one], scale))
    return torch.cat(parts).float()


def graph_us(fn, target_ms: float = 2.0, reps: int = 5) -> float:
    """Mean GPU microseconds of one fn() call, replayed from a CUDA graph of as many calls as make
    about `target_ms` (a plain call at these sizes would time the host's launch)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    calls = max(1, min(32, math.ceil(target_ms / max(start.elapsed_time(end), 1e-3))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) * 1000 / (reps * calls)


def measure(case: tuple, ref: torch.Tensor, kernel: str, launch: dict) -> dict:
    """One launch on one case: time, GB/s, TFLOP/s, and its error against the reference."""
    q_latent = case[0]
    batch, heads, _ = q_latent.shape
    ctx = int(case[4][0])
    if kernel == "wide":
        head_blocks = -(-heads // mla.WIDE_BLOCK_H)
        splits = mla.wide_splits(batch, head_blocks, mla.sm_count(q_latent.device), launch["waves"], launch["max_splits"])
        fn = lambda: mla.mla_decode_wide(*case, config=launch)  # noqa: E731
    else:
        head_blocks = -(-heads // (launch.get("block_h") or mla.default_block_h(heads, KV_LORA)))
        splits = mla.num_splits(batch, head_blocks, mla.sm_count(q_latent.device))
        fn = lambda: mla.mla_decode_narrow(*case, **launch)  # noqa: E731
    row = {"kernel": kernel, "launch": launch, "splits": splits}
    try:
        err = (fn().float() - ref).abs().max().item() / ref.abs().max().item()
        row["rel_err"] = err
        row["correct"] = err <= TOLERANCE
        row["us"] = graph_us(fn)
    except Exception as e:  # a launch that does not fit (shared memory, registers) is a result, not a stop
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        return row
    nbytes, flops = case_cost(batch, heads, ctx)
    row["GB_s"] = nbytes / row["us"] / 1e3
    row["TFLOPS"] = flops / row["us"] / 1e6
    return row


def case_cost(batch: int, heads: int, ctx: int) -> tuple[int, int]:
    """The bytes a launch must move (bf16 latent cache of every context, queries in, output out;
    the split-K partials are the kernel's own overhead, not counted) and its flops."""
    nbytes = batch * ctx * (KV_LORA + ROPE) * 2 + batch * heads * (KV_LORA + ROPE + KV_LORA) * 2
    return nbytes, batch * ctx * heads * (KV_LORA + ROPE + KV_LORA) * 2


def bench_case(heads: int, batch: int, ctx: int, args, over_budget: bool) -> dict:
    case = latent_case(batch, heads, ctx, args.block_size, seed=heads * 100003 + batch * 101 + ctx)
    ref = reference(case)
    runs = [("narrow", NARROW_CANDIDATES[0]), ("wide", mla.wide_config(batch))]
    if not over_budget:
        runs += [("narrow", c) for c in NARROW_CANDIDATES[1:]] + [("wide", c) for c in WIDE_CANDIDATES]
    rows, seen = [], []
    for kernel, launch in runs:
        if (kernel, launch) in seen:
            continue
        seen.append((kernel, launch))
        rows.append(measure(case, ref, kernel, launch))
    del case, ref
    torch.cuda.empty_cache()
    timed = [r for r in rows if r.get("correct")]
    best = {k: min((r for r in timed if r["kernel"] == k), key=lambda r: r["us"], default=None) for k in ("narrow", "wide")}
    nbytes, flops = case_cost(batch, heads, ctx)
    result = {"heads": heads, "batch": batch, "ctx": ctx, "bytes": nbytes, "flops": flops, "runs": rows}
    result["over_budget"] = over_budget
    result["narrow_default_us"] = rows[0].get("us")
    result["wide_default_us"] = rows[1].get("us")
    result["best"] = {k: r and {f: r[f] for f in ("launch", "us", "GB_s", "TFLOPS")} for k, r in best.items()}
    if best["wide"] and rows[0].get("us"):
        result["wide_best_speedup_vs_narrow_default"] = rows[0]["us"] / best["wide"]["us"]
    return result


def pick_table(cases: list[dict]) -> dict:
    """The wide launch per batch bucket with the smallest geometric mean of (its time / the best
    wide time) over the >= 64-head cases of that batch, among launches correct in all of them; and
    the fewest heads from which the wide kernel's best beat the narrow kernel's best in every case
    measured at that head count and above (WIDE_MIN_HEADS; None where it never did)."""
    table: dict[int, dict] = {}
    geomean: dict[int, float] = {}
    for batch in sorted({c["batch"] for c in cases}):
        group = [c for c in cases if c["batch"] == batch and c["heads"] >= 64 and c["best"]["wide"]]
        scores: dict[str, list[float]] = {}
        for c in group:
            for r in c["runs"]:
                if r["kernel"] == "wide" and r.get("correct"):
                    scores.setdefault(json.dumps(r["launch"], sort_keys=True), []).append(r["us"] / c["best"]["wide"]["us"])
        complete = {k: v for k, v in scores.items() if len(v) == len(group)}
        if complete:
            winner = min(complete, key=lambda k: sum(map(math.log, complete[k])))
            table[batch] = {f: json.loads(winner)[f] for f in mla.WIDE_FIELDS}
            geomean[batch] = math.exp(sum(map(math.log, complete[winner])) / len(group))
    min_heads = None
    for heads in sorted({c["heads"] for c in cases}, reverse=True):
        group = [c for c in cases if c["heads"] == heads]
        if all(c["best"]["wide"] and c["best"]["narrow"] and c["best"]["wide"]["us"] < c["best"]["narrow"]["us"] for c in group):
            min_heads = heads
        else:
            break
    paste = f"WIDE_MIN_HEADS = {min_heads!r}\nWIDE_CONFIGS: dict[int, dict] = {{\n"
    paste += "".join(f"    {b}: dict({', '.join(f'{k}={v}' for k, v in row.items())}),\n" for b, row in table.items()) + "}\n"
    return {"WIDE_CONFIGS": table, "WIDE_MIN_HEADS": min_heads, "winner_time_vs_best_geomean": geomean, "paste": paste}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "mla.json"))
    p.add_argument("--heads", type=int, nargs="+", default=[128, 64, 16], help="V3's 128 first, as the budget runs out")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--block-size", type=int, default=16, help="tokens a cache page (the engine's default)")
    p.add_argument("--budget-s", type=float, default=200, help="past it, only the default launches are timed")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_mla.py needs a CUDA GPU (the kernels' CPU check is test_deepseek_kernels.py)", file=sys.stderr)
        return 2
    started = time.time()
    results: dict = {
        "info": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__},
        "device": torch.cuda.get_device_name(),
        "sm_count": mla.sm_count(torch.device("cuda")),
        "args": vars(args),
        "wide_candidates": WIDE_CANDIDATES,
        "narrow_candidates": NARROW_CANDIDATES,
        "cases": [],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    for heads in args.heads:
        for batch in args.batches:
            for ctx in args.contexts:
                case = bench_case(heads, batch, ctx, args, time.time() - started > args.budget_s)
                failures += sum(1 for r in case["runs"] if r.get("correct") is False)
                results["cases"].append(case)
                results["table"] = pick_table(results["cases"])
                results["seconds"] = round(time.time() - started, 1)
                Path(args.out).write_text(json.dumps(results, indent=1))
                best = {k: v and (round(v["us"], 1), round(v["GB_s"]), round(v["TFLOPS"])) for k, v in case["best"].items()}
                print(json.dumps({"heads": heads, "batch": batch, "ctx": ctx, "best (us, GB/s, TFLOP/s)": best}), flush=True)
    print(results["table"]["paste"], flush=True)
    print(json.dumps({"seconds": results["seconds"], "incorrect_launches": failures}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
