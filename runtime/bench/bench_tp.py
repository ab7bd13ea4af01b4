"""Tensor-parallel benchmark: one engine configuration per run (the device script runs several),
random weights made on each GPU by its own rank (random_shards.py), so the 70B shape needs no
checkpoint and never exists whole.

Measures batch-1 decode (ms/token against the per-GPU roofline: this rank's weight bytes over the
GPU's measured copy bandwidth) and N concurrent requests of 512 tokens in / 256 out (output tok/s,
TTFT, TPOT), and with --hf the HF `generate` peer on the same shape (one GPU, bf16).

    python runtime/bench/bench_tp.py --shape llama-8b --tensor-parallel-size 2 --out tp2.json
    python runtime/bench/bench_tp.py --shape tiny --device cpu --tensor-parallel-size 2   # a quick check
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # inherited by the spawned ranks: they import random_shards

from bench_engine import SHAPES, best_of, build_hf_model, copy_bandwidth, hf_generate, run_ours  # noqa: E402
from random_shards import RandomShardRunner  # noqa: E402

from inferd.config import EngineConfig  # noqa: E402
from inferd.engine.llm_engine import LLMEngine  # noqa: E402

SHAPES = dict(SHAPES)
# DeepSeek-R1-Distill-Llama-70B
SHAPES["llama-70b"] = dict(
    SHAPES["llama-8b"],
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
)


def write_config(shape: dict, model_dir: Path) -> None:
    from transformers import LlamaConfig, Qwen2Config

    kw = {k: v for k, v in shape.items() if k != "arch"}
    cfg = (LlamaConfig if shape["arch"] == "llama" else Qwen2Config)(**kw, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM" if shape["arch"] == "llama" else "Qwen2ForCausalLM"]
    cfg.save_pretrained(model_dir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--quantization", choices=["none", "fp8"], default="none")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[64])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--b1-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--hf", action="store_true", help="also HF generate on one GPU (bf16; the 8B fits, the 70B does not)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    cuda = args.device.startswith("cuda")
    bw = copy_bandwidth(args.device)
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "args": vars(args),
        "copy_bandwidth_GB_s": bw / 1e9,
    }
    g = torch.Generator().manual_seed(1)
    prompt = lambda n: torch.randint(3, shape["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
    b1_prompt = [prompt(128)]
    loads = {n: [prompt(args.prompt_len) for _ in range(n)] for n in args.concurrency}
    key = f"tp{args.tensor_parallel_size}_{args.quantization}" + ("_kvfp8" if args.kv_cache_dtype == "fp8" else "")
    with tempfile.TemporaryDirectory() as tmp:
        write_config(shape, Path(tmp))
        t = time.perf_counter()
        config = EngineConfig(
            model=tmp,
            device=args.device,
            dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            quantization=None if args.quantization == "none" else args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=max(args.concurrency),
            cuda_graph_max_batch=max(args.concurrency),
        )
        engine = LLMEngine(config, weights=iter(()), runner_cls=RandomShardRunner)
        res["init_s"] = time.perf_counter() - t
        shard = engine.runner.weight_bytes()  # rank 0's; every rank holds the same amount
        res["weight_bytes_per_gpu"] = shard
        res["roofline_ms_per_token_per_gpu"] = shard / bw * 1000
        res["kv_blocks"] = engine.runner.num_blocks
        res["cuda_graphs"] = sorted(engine.runner.graphs)
        print(json.dumps(res), flush=True)
        try:
            run_ours(engine, b1_prompt, 8)  # warm-up
            b1 = run_ours(engine, b1_prompt, args.b1_tokens)
            b1["pct_of_roofline_per_gpu"] = 100 * res["roofline_ms_per_token_per_gpu"] / b1["tpot_ms_p50"]
            b1["achieved_GB_s_per_gpu"] = shard / (b1["tpot_ms_p50"] / 1000) / 1e9
            res[f"{key}_b1"] = b1
            print(json.dumps({f"{key}_b1": b1}), flush=True)
            for n, prompts in loads.items():
                res[f"{key}_{n}"] = run_ours(engine, prompts, args.output_len)
                print(json.dumps({f"{key}_{n}": res[f"{key}_{n}"]}), flush=True)
        finally:
            engine.close()
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if args.hf:
            hf = build_hf_model(shape, args.device, torch.bfloat16 if cuda else torch.float32, Path(tmp))
            res["hf_generate_b1"] = best_of(2, hf_generate, hf, b1_prompt, min(args.b1_tokens, 128), args.device)
            for n, prompts in loads.items():
                res[f"hf_generate_{n}"] = best_of(2, hf_generate, hf, prompts, args.output_len, args.device)
                ours = res[f"{key}_{n}"]
                ours["x_hf_generate"] = ours["output_tok_s"] / res[f"hf_generate_{n}"]["output_tok_s"]
            del hf
    print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
