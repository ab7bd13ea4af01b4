"""INT8 on one GPU: the 8B shape (random weights) decoding in bf16, fp8, int8 (W8A8) and
int8_weight_only (W8A16), each against the roofline of its own weight bytes, the GEMM
micro-benchmarks behind them, and the `inferd eval` numbers of each against bf16 on the same
weights (top-1 teacher-forced and greedy agreement: on random weights the logits are nearly flat,
so these are a lower bound of what a trained model shows).

    python runtime/bench/bench_int8.py --out $OUT/int8.json                    # on the H200, < 4 minutes
    python runtime/bench/bench_int8.py --shape tiny --device cpu --skip-gemm   # a check of the script

Per variant: batch-1 ms/token (the median step, CUDA graphs on) with the roofline (weight bytes
over the measured copy bandwidth) and the achieved GB/s; 64 requests of 512 in / 256 out (output
tok/s); the one-step graph replay at batch 1 and 64. GEMMs: the 8B shape's four projections at
1 to 4,096 rows, microseconds per call in a CUDA graph, for the bf16 product, fp8 (quant.py),
W8A8 through torch._int_mm (padded below 17 rows) and through the Triton kernel (scales in the
epilogue), and W8A16 through the Triton kernel and through gpt-fast's eager line."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engine import (  # noqa: E402
    SHAPES,
    build_engine,
    build_hf_model,
    copy_bandwidth,
    free_device_memory,
    graph_us,
    replay_ms,
    run_info,
    run_ours,
)

from inferd.eval import greedy, greedy_agreement, score  # noqa: E402
from inferd.layers.int8 import (  # noqa: E402
    _quantize_rows,
    _scale_int32,
    int8_mm,
    quantize_weight_int8,
    w8a8_linear,
    w8a16_reference,
)

VARIANTS = ["none", "fp8", "int8", "int8_weight_only"]
# The 8B shape's projections as (N, K): qkv, o, gate_up, down.
GEMMS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def gemm_variants(x, w, int8_weight, fp8_weight) -> dict:
    """The products compared, each a call of no arguments for `graph_us`."""
    from inferd.layers.int8_kernels import w8a8_matmul, w8a16_matmul
    from inferd.layers.quant import fp8_linear

    w8, s8 = int8_weight

    def triton_w8a8():
        xq, xs = _quantize_rows(x)
        return w8a8_matmul(xq, xs, w8, s8, None, torch.bfloat16)

    def int_mm_w8a8():  # torch._int_mm at every size (padded below 17 rows) and a scaling pass
        xq, xs = _quantize_rows(x)
        return _scale_int32(int8_mm(xq, w8), xs, s8, None, x)

    return {
        "bf16": lambda: F.linear(x, w),
        "fp8": lambda: fp8_linear(x, *fp8_weight, None),
        "int8_engine": lambda: w8a8_linear(x, w8, s8, None),  # what the engine runs at this size
        "int8_int_mm": int_mm_w8a8,
        "int8_triton": triton_w8a8,
        "w8a16_triton": lambda: w8a16_matmul(x, w8, s8, None),
        "w8a16_eager": lambda: w8a16_reference(x, w8, s8, None),
    }


def gemm_bench(rows: list[int]) -> dict:
    from inferd.layers.quant import quantize_weight

    out = {}
    for name, (n, k) in GEMMS.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        int8_weight, fp8_weight = quantize_weight_int8(w), quantize_weight(w)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {}
            for variant, fn in gemm_variants(x, w, int8_weight, fp8_weight).items():
                try:
                    us = graph_us(fn)
                except Exception as e:  # a kernel that fails at one size is a result, not the end of the run
                    row[variant] = {"error": f"{type(e).__name__}: {e}"[:200]}
                    continue
                weight_bytes = n * k * (2 if variant == "bf16" else 1)
                row[variant] = {"us": round(us, 2), "weight_GB_s": round(weight_bytes / us / 1e3, 1)}
            out[f"{name}_{n}x{k}_m{m}"] = row
            print(json.dumps({f"{name}_m{m}": row}), flush=True)
        torch.cuda.empty_cache()
    return out


def agreement_probe(engine, prompts: list[list[int]], greedy_tokens: int) -> dict:
    """What `inferd eval` measures, on random prompts: top-1 ids teacher-forced and greedy tokens."""
    spans = [(0, len(p), 1) for p in prompts]
    ids_per_prompt = []
    for p, span in zip(prompts, spans):
        _, top1 = score(engine, p, [span])
        ids_per_prompt.append(top1)
    return {"top1": ids_per_prompt, "greedy": greedy(engine, prompts, greedy_tokens)}


def bench(args, bandwidth: float) -> dict:
    shape = SHAPES[args.shape]
    g = torch.Generator().manual_seed(1)
    rand_prompt = lambda n: torch.randint(3, shape["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
    b1_prompt = [rand_prompt(128)]
    load = [rand_prompt(args.prompt_len) for _ in range(args.concurrency)]
    probe_prompts = [rand_prompt(256) for _ in range(4)]
    res: dict = {"shape": args.shape}
    probes = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_hf_model(shape, args.device, torch.bfloat16, Path(tmp))
        res["bf16_weight_bytes"] = sum(p.numel() * p.element_size() for p in hf.parameters())
        state = {k: v.to("cpu") for k, v in hf.state_dict().items()}
        del hf
        free_device_memory(args.device)
        for variant in args.variants:
            t = time.perf_counter()
            engine = build_engine(
                variant,
                state,
                model=tmp,
                device=args.device,
                dtype="bfloat16" if args.device != "cpu" else "float32",
                max_model_len=1024,
                max_num_seqs=args.concurrency,
                cuda_graph_max_batch=args.concurrency,
            )
            r = res[variant] = {"init_s": round(time.perf_counter() - t, 1)}
            weight_bytes = r["weight_bytes"] = engine.runner.weight_bytes()
            run_ours(engine, b1_prompt, 8)  # warm-up
            b1 = run_ours(engine, b1_prompt, args.b1_tokens)
            step_ms = b1["tpot_ms_p50"]
            roofline_ms = weight_bytes / bandwidth * 1000
            r["b1"] = {
                "ms_per_token": step_ms,
                "own_roofline_ms": roofline_ms,
                "pct_of_own_roofline": 100 * roofline_ms / step_ms,
                "achieved_GB_s": weight_bytes / (step_ms / 1000) / 1e9,
                "x_bf16_step": None,
            }
            if engine.runner.graphs:
                graphs = engine.runner.graphs
                r["graph_replay_ms"] = {bs: replay_ms(graphs[bs]) for bs in (1, args.concurrency) if bs in graphs}
            key = f"load_{args.concurrency}x{args.prompt_len}/{args.output_len}"
            r[key] = run_ours(engine, load, args.output_len)
            for i in range(1, args.loads):  # again, on the warm engine (the first may hold one-off costs)
                r[f"{key}#{i + 1}"] = run_ours(engine, load, args.output_len)
            probes[variant] = agreement_probe(engine, probe_prompts, args.greedy_tokens)
            print(json.dumps({variant: r}), flush=True)
            engine.close()
            del engine
            free_device_memory(args.device)
    base = res.get("none")
    for variant in args.variants:
        if base and variant != "none":
            res[variant]["b1"]["x_bf16_step"] = base["b1"]["ms_per_token"] / res[variant]["b1"]["ms_per_token"]
        if "none" in probes and variant != "none":
            ref, got = probes["none"], probes[variant]
            pairs = [(a, b) for p, q in zip(got["top1"], ref["top1"]) for a, b in zip(p, q)]
            res[variant]["agreement_vs_bf16"] = {
                "top1_teacher_forced": sum(a == b for a, b in pairs) / len(pairs),
                "greedy": greedy_agreement(got["greedy"], ref["greedy"]),
                "prompts": len(probe_prompts),
                "greedy_tokens": args.greedy_tokens,
            }
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--loads", type=int, default=1, help="times the concurrent load runs on each engine")
    ap.add_argument("--b1-tokens", type=int, default=128)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--gemm-rows", nargs="+", type=int, default=[1, 16, 64, 512, 4096])
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    info = run_info(args)
    bw = copy_bandwidth(args.device)
    info["copy_bandwidth_GB_s"] = bw / 1e9
    print(json.dumps(info), flush=True)
    result: dict = {"info": info}
    if not args.skip_gemm:
        result["gemm_us"] = gemm_bench(args.gemm_rows)
    if not args.skip_engine:
        result["engine"] = bench(args, bw)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result.get("engine", {}), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
