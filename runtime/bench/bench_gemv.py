"""The batch-1 GEMV kernels (layers/gemv.py) against cuBLAS (CUDA).

1. `sweep`: each projection of the 1.5B and 8B shapes at one row, as the engine calls it (qkv with
   the add + norm prologue and, for Qwen, the bias; o_proj plain; gate_up with the norm prologue
   and the SiLU epilogue; down_proj plain), over launch configurations, against F.linear (plus
   the separate norm / SiLU kernels the plain path launches); microseconds in a CUDA graph and
   the weight bytes per second.
2. `rows`: each projection over the rows of a verify pass computed as one (`--rows`, as the
   speculative decoder's batch-1 verify pass runs them), against the same call at one row, the
   rows taken one at a time, and cuBLAS over the rows; every row checked bit for bit
   against its 1-row call.
3. `chain`: the linear part of a whole decode step (every layer's four projections with their
   norms and SiLU, no attention) in one CUDA graph: cuBLAS + separate kernels, the GEMV kernels
   with the default configuration, and with programmatic dependent launch.

    python runtime/bench/bench_gemv.py --out gemv.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
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


def _compile_configs(name: str, proj: str, dtype: str, configs: list, rows: int) -> int:
    """In a worker process: build each configuration's kernels (1 row, and `rows` rows) into
    Triton's on-disk cache, so the timing process finds them compiled."""
    p = projections(SHAPES[name])[proj]
    w, x, b, norm = tensors(p, getattr(torch, dtype))
    xr = x.expand(rows, -1).contiguous()
    normr = None if norm is None else (norm[0].expand(rows, -1).contiguous(), norm[1], norm[2], torch.empty_like(xr))
    built = 0
    for cfg in configs:
        for xs, nm in ((x, norm), (xr, normr)) if rows > 1 else ((x, norm),):
            try:
                gemv(xs, w, b, norm=nm, silu=p["silu"], use_pdl=True, config=cfg)
                built += 1
            except Exception:  # the timing process records it
                pass
    torch.cuda.synchronize()
    return built


def precompile(name: str, proj: str, dtype: str, configs: list, rows: int, workers: int = 12) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    parts = [configs[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile_configs, *zip(*[(name, proj, dtype, part, rows) for part in parts if part])))


def sweep(args, bandwidth: float, results: list, checkpoint) -> None:
    """Each projection at one row over launch configurations (programmatic dependent launch on);
    with --rows > 1 each configuration also over that many rows computed as one (a verify pass
    and the batch-1 step share a configuration: that is what keeps their rows bit for bit equal)."""
    dtype = getattr(torch, args.dtype)
    grid = itertools.product(args.block_n, args.block_k, args.warps)
    configs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=wp) for bn, bk, wp in grid]
    for name in args.shapes:
        for proj, p in projections(SHAPES[name]).items():
            try:
                precompile(name, proj, args.dtype, configs, args.rows)
            except Exception as e:  # only a head start: the timing below compiles what is missing
                print(f"precompiling {name} {proj} failed ({e}); compiling while timing", flush=True)
            w, x, b, norm = tensors(p, dtype)
            xr = torch.randn(args.rows, p["k"], device="cuda", dtype=dtype)
            normr = None if norm is None else (torch.randn_like(xr), norm[1], norm[2], torch.empty_like(xr))
            nbytes = w.numel() * w.element_size()
            ideal_us = nbytes / bandwidth * 1e6
            cublas_us = graph_us(functools.partial(F.linear, x, w, b), calls=20, reps=10)
            plain_us = graph_us(functools.partial(plain_call, w, x, b, norm, p["silu"]), calls=20, reps=10)
            want = plain_call(w, x, b, norm, p["silu"]).float()
            n_out = p["n"] // 2 if p["silu"] else p["n"]
            timings = []
            for cfg in configs:
                call = functools.partial(gemv, x, w, b, norm=norm, silu=p["silu"], use_pdl=True, config=cfg)
                try:
                    err = (call().float() - want).abs().max().item()
                    us = graph_us(call, calls=20, reps=10)
                except Exception as e:  # a configuration that does not build is a result
                    timings.append({**cfg, "error": str(e)[:160]})
                    continue
                timing = {**cfg, "us": us, "max_abs_err": err}
                if args.rows > 1:
                    call_rows = functools.partial(gemv, xr, w, b, norm=normr, silu=p["silu"], use_pdl=True, config=cfg)
                    try:
                        timing["rows_us"] = graph_us(call_rows, calls=20, reps=10)
                    except Exception as e:
                        timing["rows_error"] = str(e)[:160]
                timings.append(timing)
            timed = sorted((r for r in timings if "us" in r), key=lambda r: r["us"])
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
                "sweep": timed,
            }
            print(json.dumps({k: v for k, v in entry.items() if k != "sweep"}), flush=True)
            results.append(entry)
            checkpoint()


def rows_entry(p: dict, r: int, dtype, bandwidth: float) -> dict:
    """One projection over r rows computed as one (see the module's docstring)."""
    w, x1, b, norm1 = tensors(p, dtype)
    x = torch.randn(r, p["k"], device="cuda", dtype=dtype)
    norm = None if norm1 is None else (torch.randn_like(x), norm1[1], norm1[2], torch.empty_like(x))
    default = gemv_config(p["n"] // 2 if p["silu"] else p["n"], p["k"], p["norm"], p["silu"])

    def call(xs, nm, **cfg):
        return gemv(xs, w, b, norm=nm, silu=p["silu"], use_pdl=True, config=default | cfg)

    def row_norm(i):
        return None if norm is None else (norm[0][i : i + 1], norm[1], norm[2], torch.empty_like(x1))

    together = call(x, norm)
    equal = sum(torch.equal(together[i : i + 1], call(x[i : i + 1], row_norm(i))) for i in range(r))
    return {
        **p,
        "rows": r,
        "config": default,
        "ideal_us": w.numel() * w.element_size() / bandwidth * 1e6,
        "one_row_us": graph_us(functools.partial(call, x1, norm1), calls=20, reps=10),
        "rows_together_us": graph_us(functools.partial(call, x, norm), calls=20, reps=10),
        "rows_in_turn_us": graph_us(functools.partial(call, x, norm, rows_together=1), calls=20, reps=10),
        "cublas_rows_us": graph_us(functools.partial(plain_call, w, x, b, norm, p["silu"]), calls=20, reps=10),
        "rows_bitwise_equal_to_one_row_calls": equal,
    }


def rows(args, bandwidth: float, results: list, checkpoint) -> None:
    dtype = getattr(torch, args.dtype)
    for name in args.shapes:
        for proj, p in projections(SHAPES[name]).items():
            entry = {"shape": name, "proj": proj, **rows_entry(p, args.rows, dtype, bandwidth)}
            print(json.dumps(entry), flush=True)
            results.append(entry)
            checkpoint()


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


def chain(args, bandwidth: float, results: list, checkpoint) -> None:
    """The linear part of a decode step: per layer the four projections with their norms and SiLU."""
    from inferd.layers.gemv import set_pdl

    dtype = getattr(torch, args.dtype)
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
        results.append(entry)
        checkpoint()
        del weights, args_
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", default=["sweep", "chain"], help="sweep, rows and/or chain (default: sweep and chain)")
    ap.add_argument("--rows", type=int, default=5, help="rows (and sweep): the rows computed as one (k + 1 of a verify pass)")
    ap.add_argument("--shapes", nargs="+", default=["qwen-1.5b", "llama-8b"], choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--block-n", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--block-k", nargs="+", type=int, default=[512, 1024, 2048])
    ap.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if set(args.what) - {"sweep", "rows", "chain"}:
        ap.error(f"what: sweep, rows and/or chain, got {args.what}")
    args.device = "cuda"
    info = run_info(args)
    bw = copy_bandwidth("cuda")
    info["copy_bandwidth_GB_s"] = bw / 1e9
    print(json.dumps(info), flush=True)
    res: dict = {what: [] for what in args.what}

    def checkpoint():  # after every entry: a run cut short by a time limit keeps what it measured
        if args.out:
            part = Path(f"{args.out}.part")
            part.write_text(json.dumps({"info": info, **res}, indent=2))
            os.replace(part, args.out)  # never a half-written file under the name

    t = time.perf_counter()
    for what in args.what:
        {"sweep": sweep, "rows": rows, "chain": chain}[what](args, bw, res[what], checkpoint)
    info["seconds"] = time.perf_counter() - t
    checkpoint()
    return 0


if __name__ == "__main__":
    sys.exit(main())
