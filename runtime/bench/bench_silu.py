"""SiLU-and-multiply kernel (`layers/triton_fused.py`) per launch width, timed from CUDA-graph
replays of 20 launches: the sweep behind `_silu_warps`.

    python runtime/bench/bench_silu.py --out silu.json      # on the GPU machine
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_engine import graph_us  # noqa: E402

from inferd.layers.triton_fused import silu_and_mul_triton  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", nargs="+", type=int, default=[14336, 8960], help="intermediate sizes: 8B, 1.5B")
    ap.add_argument("--rows", nargs="+", type=int, default=[64, 1, 8192])
    ap.add_argument("--warps", nargs="+", type=int, default=[4, 8, 16, 32])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    for n in args.widths:
        for rows in args.rows:
            x = torch.randn(rows, 2 * n, device="cuda").bfloat16() * 100
            xs = torch.rand(rows, 1, device="cuda") + 0.5
            ws = torch.rand(1, 2 * n, device="cuda") / 100
            for warps in args.warps:
                for quant in ("fp8", None):
                    launch = functools.partial(silu_and_mul_triton, x, xs, ws, None, quant, num_warps=warps)
                    us = graph_us(launch, calls=20, reps=20)
                    moved = rows * n * (4 + (1 if quant else 2))  # bf16 gate+up in, fp8 or bf16 out
                    results.append(dict(n=n, rows=rows, warps=warps, quant=quant, us=round(us, 2), GB_s=round(moved / us / 1e3)))
                    print(results[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
