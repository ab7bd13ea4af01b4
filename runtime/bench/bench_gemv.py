"""The batch-1 GEMV kernels (layers/gemv.py) against cuBLAS (CUDA).

1. `sweep`: each projection of the 1.5B and 8B shapes at one row, as the engine calls it (qkv with
   the add + norm prologue and, for Qwen, the bias; o_proj plain; gate_up with the norm prologue
   and the SiLU epilogue; down_proj plain), over launch configurations, against F.linear (plus
   the separate norm / SiLU kernels the plain path launches); microseconds in a CUDA graph and
   the weight bytes per second.
2. `chain`: the linear part of a whole decode step (every layer's four projections with their
   norms and SiLU, no attention) in one CUDA graph: cuBLAS + separate kernels, the GEMV kernels
   with the default configuration, and with programmatic dependent launch.

    python runtime/bench/bench_gemv.py --out gemv.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import SHAPES, copy_bandwidth, graph_us, replay_ms, run_info  # noqa: E402

from inferd.layers.fused import add_rms_norm  # noqa: E402
from inferd.layers.gemv import gemv, gemv_config  # noqa: E402
from inferd.layers.triton_fused import silu_and_mul_triton  # noqa: E402


def projections(shape: dict) -> dict:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    head_dim = h // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * head_dim
    bias = shape.get("arch", "llama") == "qwen2"
    return {
        "qkv": dict(n=qkv, k=h, norm=True, silu=False, bias=bias),
        "o": dict(n=h, k=h, norm=False, silu=False, bias=False),
        "gate_up": dict(n=2 * i, k=h, norm=True, silu=True, bias=False),
        "down": dict(n=h, k=i, norm=False, silu=False, bias=False),
    }


def tensors(p: dict, dtype):
    w = torch.randn(p["n"], p["k"], device="cuda", dtype=dtype) * 0.02
    x = torch.randn(1, p["k"], device="cuda", dtype=dtype)
    b = torch.randn(p["n"], device="cuda", dtype=dtype) if p["bias"] else None
    norm = None
    if p["norm"]:
        norm = (torch.randn_like(x), torch.ones(p["k"], device="cuda", dtype=dtype), 1e-6, torch.empty_like(x))
    return w, x, b, norm


def plain_call(w, x, b, norm, silu):
    """What the engine launches without the GEMV kernels."""
    if norm is not None:
        x, _ = add_rms_norm(x, None, None, None, norm[0], norm[1], norm[2])
    out = F.linear(x, w, b)
    return silu_and_mul_triton(out) if silu else out


def sweep(args, bandwidth: float) -> dict:
    dtype = getattr(torch, args.dtype)
    results = []
    for name in args.shapes:
        for proj, p in projections(SHAPES[name]).items():
            w, x, b, norm = tensors(p, dtype)
            nbytes = w.numel() * w.element_size()
            ideal_us = nbytes / bandwidth * 1e6
            cublas_us = graph_us(functools.partial(F.linear, x, w, b), calls=20, reps=10)
            plain_us = graph_us(functools.partial(plain_call, w, x, b, norm, p["silu"]), calls=20, reps=10)
            want = plain_call(w, x, b, norm, p["silu"]).float()
            n_out = p["n"] // 2 if p["silu"] else p["n"]
            rows = []
            for bn, bk, warps, use_pdl in itertools.product(args.block_n, args.block_k, args.warps, (False, True)):
                cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
                call = functools.partial(gemv, x, w, b, norm=norm, silu=p["silu"], use_pdl=use_pdl, config=cfg)
                try:
                    err = (call().float() - want).abs().max().item()
                    us = graph_us(call, calls=20, reps=10)
                except Exception as e:  # a configuration that does not build is a result
                    rows.append({**cfg, "pdl": use_pdl, "error": str(e)[:160]})
                    continue
                rows.append({**cfg, "pdl": use_pdl, "us": us, "max_abs_err": err})
            timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
            default = gemv_config(n_out, p["k"], p["norm"], p["silu"])
            default_us = graph_us(functools.partial(gemv, x, w, b, norm=norm, silu=p["silu"], use_pdl=True), calls=20, reps=10)
            entry = {
                "shape": name,
                "proj": proj,
                **p,
                "weight_MB": nbytes / 1e6,
                "ideal_us": ideal_us,
                "cublas_us": cublas_us,
                "cublas_pct_bw": 100 * ideal_us / cublas_us,
                "plain_path_us": plain_us,
                "default_config": default,
                "default_us": default_us,
                "default_pct_bw": 100 * ideal_us / default_us,
                "best": timed[0] if timed else None,
                "best_pct_bw": 100 * ideal_us / timed[0]["us"] if timed else None,
                "sweep": timed[:10],
            }
            print(json.dumps({k: v for k, v in entry.items() if k != "sweep"}), flush=True)
            results.append(entry)
    return {"sweep": results}


def plain_chain(weights, x0, bias, gamma, h):
    hidden, residual = x0, torch.zeros_like(x0)
    for lw in weights:
        normed, residual = add_rms_norm(hidden, None, None, None, residual, gamma, 1e-6)
        attn_in = F.linear(normed, lw["qkv"], bias)
        o = F.linear(attn_in[:, :h].contiguous(), lw["o"])  # stands in for attention's output
        normed, residual = add_rms_norm(o, None, None, None, residual, gamma, 1e-6)
        hidden = F.linear(silu_and_mul_triton(F.linear(normed, lw["gate_up"])), lw["down"])
    return hidden


def gemv_chain(weights, x0, bias, gamma, h):
    hidden, residual = x0, torch.zeros_like(x0)
    for lw in weights:
        res_out = torch.empty_like(hidden)
        attn_in = gemv(hidden, lw["qkv"], bias, norm=(residual, gamma, 1e-6, res_out))
        o = gemv(attn_in[:, :h].contiguous(), lw["o"])
        residual, res_out = res_out, torch.empty_like(hidden)
        act = gemv(o, lw["gate_up"], None, norm=(residual, gamma, 1e-6, res_out), silu=True)
        residual = res_out
        hidden = gemv(act, lw["down"])
    return hidden


def chain(args, bandwidth: float) -> dict:
    """The linear part of a decode step: per layer the four projections with their norms and SiLU."""
    from inferd.layers.gemv import set_pdl

    dtype = getattr(torch, args.dtype)
    out = []
    for name in args.shapes:
        shape = SHAPES[name]
        layers = shape["num_hidden_layers"]
        projs = projections(shape)
        weights = [{k: tensors(p, dtype)[0] for k, p in projs.items()} for _ in range(layers)]
        h = shape["hidden_size"]
        bias = torch.randn(projs["qkv"]["n"], device="cuda", dtype=dtype) if projs["qkv"]["bias"] else None
        gamma = torch.ones(h, device="cuda", dtype=dtype)
        nbytes = sum(w.numel() * w.element_size() for lw in weights for w in lw.values())
        x0 = torch.randn(1, h, device="cuda", dtype=dtype)

        args_ = (weights, x0, bias, gamma, h)
        entry = {"shape": name, "layers": layers, "weight_GB": nbytes / 1e9, "ideal_ms": nbytes / bandwidth * 1e3}
        for label, fn, pdl in (("cublas", plain_chain, False), ("gemv", gemv_chain, False), ("gemv_pdl", gemv_chain, True)):
            set_pdl(pdl)
            fn(*args_)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = fn(*args_)
            ms = replay_ms(graph, 20)
            entry[f"{label}_ms"] = ms
            entry[f"{label}_pct_bw"] = 100 * entry["ideal_ms"] / ms
            entry[f"{label}_out"] = result.float()
            del graph
        set_pdl(False)
        ref = entry.pop("cublas_out")
        for label in ("gemv", "gemv_pdl"):
            got = entry.pop(f"{label}_out")
            entry[f"{label}_rel_err"] = ((got - ref).norm() / ref.norm()).item()
        print(json.dumps(entry), flush=True)
        out.append(entry)
        del weights, args_
        torch.cuda.empty_cache()
    return {"chain": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", default=["sweep", "chain"], help="sweep and/or chain (default: both)")
    ap.add_argument("--shapes", nargs="+", default=["qwen-1.5b", "llama-8b"], choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--block-n", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--block-k", nargs="+", type=int, default=[512, 1024, 2048])
    ap.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if set(args.what) - {"sweep", "chain"}:
        ap.error(f"what: sweep and/or chain, got {args.what}")
    args.device = "cuda"
    info = run_info(args)
    bw = copy_bandwidth("cuda")
    info["copy_bandwidth_GB_s"] = bw / 1e9
    print(json.dumps(info), flush=True)
    res: dict = {}
    t = time.perf_counter()
    for what in args.what:
        res |= {"sweep": sweep, "chain": chain}[what](args, bw)
    info["seconds"] = time.perf_counter() - t
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, **res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
