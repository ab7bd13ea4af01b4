"""DeepSeek benchmark on the GPU machine, three parts, each written to the results as it ends:

- kernel: the latent MLA decode kernel alone (layers/mla_decode.py), captured in a CUDA graph,
  its achieved GB/s against the bytes it must read (the latent cache of every context, the
  queries, the output), for V2-Lite's 16 and V3's 128 heads; FlashMLA's published figure is
  3,000 GB/s memory-bound on an H800. A few launch configurations are swept, the best kept.
- moe: one V2-Lite MoE layer's routed experts through both fused_moe implementations
  (torch._grouped_mm and the Triton grouped GEMM), GPU time and GB/s over the touched experts.
- v3: a full-width DeepSeek-V3 slice (hidden 7168, 128 heads, q_lora 1536, 256 experts top-8,
  n_group 8 / topk_group 4, fp8 128x128 blocks), `--v3-layers` MoE decoder layers composed from
  the engine's CUDA pieces (fp8_block_linear, mla_decode with the absorbed projections, the
  grouped router, fused_moe on fp8 experts, the shared expert) and captured in one CUDA graph:
  step time against its bound, the bytes one step must read (the weights it touches: attention,
  router, shared expert and the experts the batch routes to, counted from the routing, plus the
  latent cache) over HBM bandwidth. Rotary embedding and the cache write are left out (a few us).
- lite: the DeepSeek-V2-Lite shape (27 layers, hidden 2048, 16 heads, kv_lora 512, 64 experts
  top-6, 2 shared) in bf16 with random weights, HF `generate` on the same weights in the same
  process, then our engine, at batch 1, 16 and 64 x 512 in / 256 out; the roofline per step is
  the active weight bytes (the experts the batch is expected to touch) plus the latent cache.

    python runtime/bench/bench_deepseek.py --out results.json      # on the GPU machine
    python runtime/bench/bench_deepseek.py --parts lite --lite-layers 2 --concurrency 1 --device cpu --skip-peers  # a quick check
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import best_of, build_engine, copy_bandwidth, graph_us, hf_generate, run_info, run_ours, sync  # noqa: E402

HBM_BYTES_S = 4.8e12  # H200 spec sheet; the measured copy bandwidth is reported beside it
LATENT = 512 + 64  # kv_lora_rank + qk_rope_head_dim: one cached token, per layer

# DeepSeek-V2-Lite as published, less yarn (the same cost, and HF's own rope keeps the peers equal).
V2_LITE = dict(
    architectures=["DeepseekV2ForCausalLM"],
    model_type="deepseek_v2",
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=2,
    n_routed_experts=64,
    num_experts_per_tok=6,
    routed_scaling_factor=1.0,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    scoring_func="softmax",
    first_k_dense_replace=1,
    moe_layer_freq=1,
    hidden_act="silu",
    max_position_embeddings=163840,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=None,
    tie_word_embeddings=False,
    attention_bias=False,
    bos_token_id=100000,
    eos_token_id=100001,
    torch_dtype="bfloat16",
)


def expected_distinct(experts: int, k: int, tokens: int) -> float:
    """Experts a batch touches when each token picks k of them uniformly (random weights route
    about uniformly): the expert bytes a decode step must read."""
    return experts * (1 - (1 - k / experts) ** tokens)


# ---- kernel -------------------------------------------------------------------------------------
def _latent_case(batch: int, heads: int, ctx: int, block_size: int) -> tuple:
    """mla_decode's arguments: every sequence at `ctx` tokens, its blocks scattered over the cache."""
    blocks = ctx // block_size
    cache = torch.randn(batch * blocks + 1, block_size, LATENT, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(batch * blocks, device="cuda", dtype=torch.int32).view(batch, blocks)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q_latent = torch.randn(batch, heads, 512, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(batch, heads, 64, device="cuda", dtype=torch.bfloat16)
    return q_latent, q_rope, cache, tables, lens, 192**-0.5


def bench_kernel(args) -> list[dict]:
    from inferd.layers.mla_decode import mla_decode

    rows: list[dict] = []
    block_size = 16
    # The default launch (block_h 16 for 16 heads, 32 for 128) and its neighbours that ptxas fits
    # without spills (block_h 64 spills at kv_lora 512).
    # lora_parts: 64 heads a program, the latent's columns in parts (ptxas: 16-220 bytes of spills,
    # measured against the 4 reads of the tiles that blocks of 32 heads make).
    configs = [{}, dict(tile=16), dict(block_h=16), dict(block_h=32), dict(block_h=32, tile=16), dict(num_stages=3)]
    configs += [dict(block_h=64, lora_parts=4, tile=16), dict(block_h=64, lora_parts=2, tile=16)]
    for heads in (16, 128):
        for batch, ctx in ((1, 4096), (16, 4096), (64, 768), (64, 4096)):
            case = _latent_case(batch, heads, ctx, block_size)
            nbytes = batch * ctx * LATENT * 2 + batch * heads * (LATENT + 512) * 2
            best = None
            for cfg in configs + ([dict(splits=32), dict(splits=128)] if batch <= 16 else []):  # the old cap, and more
                row = {"heads": heads, "batch": batch, "ctx": ctx, "config": cfg, "default": not cfg}
                try:
                    row["us"] = graph_us(functools.partial(mla_decode, *case, **cfg))
                except Exception as e:  # a launch that does not fit (shared memory) is a result, not a stop
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                    rows.append(row)
                    continue
                row["GB_s"] = nbytes / row["us"] / 1e3
                # 128 heads do ~240 FLOP per cached byte (scores over 576 and p @ c over 512 per
                # head): past the H200's ~200 FLOP/byte ridge, so TFLOPS is their measure
                row["TFLOPS"] = batch * ctx * heads * (LATENT + 512) * 2 / row["us"] / 1e6
                rows.append(row)
                if best is None or row["us"] < best["us"]:
                    best = row
            if best is not None:
                best["best"] = True
            print(json.dumps({"kernel_best": best}), flush=True)
            del case
            torch.cuda.empty_cache()
    return rows


def bench_moe(args) -> list[dict]:
    """One V2-Lite MoE layer's routed experts (64 of 1408, top-6, bf16) through each fused_moe
    implementation, graph-captured: GPU time and GB/s over the experts the batch touches."""
    from inferd.layers.fused_moe import fused_moe

    experts, k, dim, inter = 64, 6, 2048, 1408
    w13 = torch.randn(experts, 2 * inter, dim, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(experts, dim, inter, device="cuda", dtype=torch.bfloat16) * 0.02
    rows = []
    for tokens in (1, 16, 64, 512):
        hidden = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
        weights, ids = torch.rand(tokens, experts, device="cuda").topk(k, dim=-1)
        nbytes = int(ids.unique().numel()) * 3 * inter * dim * 2
        for impl in ("grouped_mm", "triton"):
            row = {"tokens": tokens, "impl": impl, "expert_bytes": nbytes}
            try:
                row["us"] = graph_us(functools.partial(fused_moe, hidden, w13, w2, weights, ids, impl=impl))
                row["GB_s"] = nbytes / row["us"] / 1e3
            except Exception as e:  # reported, the other implementation still measured
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
            print(json.dumps({"moe": row}), flush=True)
    return rows


# ---- V3 slice -----------------------------------------------------------------------------------
def _fp8_weight(n: int, k: int, experts: int | None = None):
    """Random e4m3 weights in 128x128 blocks with plausible scales, built chunk by chunk on the GPU."""
    from inferd.layers.fp8_block import FP8

    lead = () if experts is None else (experts,)
    w = torch.empty(*lead, n, k, device="cuda", dtype=FP8)
    flat = w.view(-1, n, k)
    for i in range(0, flat.shape[0], 16):
        flat[i : i + 16] = (torch.randn(flat[i : i + 16].shape, device="cuda", dtype=torch.bfloat16) * 64).to(FP8)
    scale = torch.full((*lead, -(-n // 128), -(-k // 128)), 2e-4, device="cuda")
    return w, scale


def _v3_layer():
    heads, nope, rope, v, qr, kvr, dim, inter, experts = 128, 128, 64, 128, 1536, 512, 7168, 2048, 256
    layer = {
        "q_a": _fp8_weight(qr, dim),
        "q_b": _fp8_weight(heads * (nope + rope), qr),
        "kv_a": _fp8_weight(kvr + rope, dim),
        "o": _fp8_weight(dim, heads * v),
        "w_uk": torch.randn(heads, nope, kvr, device="cuda", dtype=torch.bfloat16) * 0.04,
        "w_uv": torch.randn(heads, v, kvr, device="cuda", dtype=torch.bfloat16) * 0.04,
        "gate": torch.randn(experts, dim, device="cuda") * 0.02,
        "bias": torch.randn(experts, device="cuda") * 0.01,
        "w13": _fp8_weight(2 * inter, dim, experts),
        "w2": _fp8_weight(dim, inter, experts),
        "shared13": _fp8_weight(2 * inter, dim),
        "shared2": _fp8_weight(dim, inter),
    }
    return layer


def _nbytes(x) -> int:
    if isinstance(x, tuple):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size()


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, (x.shape[-1],))


def _v3_step(layers, cache, tables, lens, moe, x, record=None):
    """One decode step through the slice's layers: absorbed MLA on the latent cache, then the
    routed and shared experts. `record` collects the experts each layer's routing touched."""
    import torch.nn.functional as F

    from inferd.layers.fp8_block import fp8_block_linear
    from inferd.layers.fused_moe import fused_moe
    from inferd.layers.mla_decode import mla_decode
    from inferd.models.deepseek import route

    batch = x.shape[0]
    for layer, c in zip(layers, cache):
        h = _rms(x)
        q = fp8_block_linear(_rms(fp8_block_linear(h, *layer["q_a"])), *layer["q_b"]).view(batch, 128, 192)
        fp8_block_linear(h, *layer["kv_a"])  # the new latent (its cache write left out)
        q_latent = torch.einsum("bhn,hnc->bhc", q[..., :128], layer["w_uk"])
        out = mla_decode(q_latent, q[..., 128:].contiguous(), c, tables, lens, 192**-0.5)
        out = torch.einsum("bhc,hvc->bhv", out, layer["w_uv"]).reshape(batch, -1)
        x = x + fp8_block_linear(out, *layer["o"])
        h = _rms(x)
        weights, ids = route(F.linear(h.float(), layer["gate"]), layer["bias"], moe)
        if record is not None:
            record.append(int(ids.unique().numel()))
        routed = fused_moe(h, layer["w13"][0], layer["w2"][0], weights, ids, layer["w13"][1], layer["w2"][1])
        shared = fp8_block_linear(h, *layer["shared13"])
        shared = fp8_block_linear(F.silu(shared[:, :2048]) * shared[:, 2048:], *layer["shared2"])
        x = x + routed + shared
    return x


def bench_v3(args, bandwidth: float) -> dict:
    from inferd.models.config import MoEConfig

    moe = MoEConfig(
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        moe_intermediate_size=2048,
        first_k_dense_replace=0,
        moe_layer_freq=1,
        n_group=8,
        topk_group=4,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )
    torch.manual_seed(0)
    layers = [_v3_layer() for _ in range(args.v3_layers)]
    res: dict = {"layers": args.v3_layers, "context": args.v3_context, "steps": {}}
    dense = ("q_a", "q_b", "kv_a", "o", "w_uk", "w_uv", "gate", "shared13", "shared2")
    per_layer_dense = sum(_nbytes(layers[0][k]) for k in dense)
    per_expert = (_nbytes(layers[0]["w13"]) + _nbytes(layers[0]["w2"])) // 256
    res["dense_bytes_per_layer"], res["bytes_per_expert"] = per_layer_dense, per_expert
    block_size, ctx = 16, args.v3_context
    for batch in args.v3_batches:
        blocks = ctx // block_size
        cache = [torch.randn(batch * blocks + 1, block_size, LATENT, device="cuda", dtype=torch.bfloat16) for _ in layers]
        tables = torch.randperm(batch * blocks, device="cuda", dtype=torch.int32).view(batch, blocks)
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        x0 = torch.randn(batch, 7168, device="cuda", dtype=torch.bfloat16)
        touched = []

        step = functools.partial(_v3_step, layers, cache, tables, lens, moe)
        with torch.inference_mode():
            step(x0, touched)  # compile, and count the experts this batch's routing touches
            sync("cuda")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(x0)
            graph.replay()
            sync("cuda")
            reps = 20
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            sync("cuda")
            ms = start.elapsed_time(end) / reps
        nbytes = len(layers) * (per_layer_dense + batch * ctx * LATENT * 2) + sum(touched) * per_expert
        res["steps"][batch] = {
            "step_ms": ms,
            "experts_touched_per_layer": touched,
            "bytes": nbytes,
            "bound_ms_hbm": nbytes / HBM_BYTES_S * 1e3,
            "bound_ms_copy": nbytes / bandwidth * 1e3,
            "pct_of_hbm_bound": 100 * nbytes / HBM_BYTES_S * 1e3 / ms,
            "achieved_GB_s": nbytes / ms / 1e6,
        }
        print(json.dumps({"v3_step": {batch: res["steps"][batch]}}), flush=True)
        del graph, cache
        torch.cuda.empty_cache()
    return res


# ---- V2-Lite through the engine -----------------------------------------------------------------
def lite_config(layers: int) -> dict:
    return {**V2_LITE, "num_hidden_layers": layers}


def build_hf_lite(config: dict, device: str, dtype: torch.dtype):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    ours_only = ("architectures", "model_type", "torch_dtype", "rope_scaling", "rope_theta")
    kw = {k: v for k, v in config.items() if k not in ours_only}
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    torch.manual_seed(0)
    with torch.device(device):
        return DeepseekV2ForCausalLM(DeepseekV2Config(**kw)).to(dtype).eval()


def checkpoint_tensors(state: dict):
    """HF 5's state dict stacks each layer's routed experts (experts.gate_up_proj [E, 2I, D],
    experts.down_proj [E, D, I]); a checkpoint, which our loader reads, names them one by one."""
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", t[e, :inter]
                yield f"{prefix}{e}.up_proj.weight", t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", t[e]
        else:
            yield name, t


def lite_step_bytes(config: dict, weight_bytes: int, batch: int, context: int) -> int:
    """Bytes one decode step reads: every weight but the routed experts and the embedding table
    (a row per token), the experts the batch is expected to touch in each MoE layer, and the
    latent cache of every sequence."""
    experts, inter, dim = config["n_routed_experts"], config["moe_intermediate_size"], config["hidden_size"]
    moe_layers = config["num_hidden_layers"] - config["first_k_dense_replace"]
    per_expert = 3 * inter * dim * 2
    dense = weight_bytes - moe_layers * experts * per_expert - config["vocab_size"] * dim * 2
    routed = moe_layers * expected_distinct(experts, config["num_experts_per_tok"], batch) * per_expert
    return int(dense + routed + batch * context * LATENT * 2 * config["num_hidden_layers"])


def bench_lite(args, bandwidth: float) -> dict:
    device, dtype = args.device, torch.bfloat16
    config = lite_config(args.lite_layers)
    g = torch.Generator().manual_seed(1)
    rand_prompt = lambda n: torch.randint(3, config["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
    loads = {n: [rand_prompt(args.prompt_len) for _ in range(n)] for n in args.concurrency}
    res: dict = {"layers": args.lite_layers}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        hf = build_hf_lite(config, device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        res["weight_bytes"] = weight_bytes
        mid_context = args.prompt_len + args.output_len // 2
        for n in loads:
            step_bytes = lite_step_bytes(config, weight_bytes, n, mid_context)
            res[f"roofline_{n}"] = {
                "step_bytes": step_bytes,
                "step_ms_hbm": step_bytes / HBM_BYTES_S * 1e3,
                "step_ms_copy": step_bytes / bandwidth * 1e3,
                "output_tok_s_hbm": n / (step_bytes / HBM_BYTES_S),
            }
        if not args.skip_peers:
            for n, prompts in loads.items():
                res[f"hf_generate_{n}"] = best_of(args.peer_repeats, hf_generate, hf, prompts, args.peer_output_len, device)
                print(json.dumps({f"hf_generate_{n}": res[f"hf_generate_{n}"]}), flush=True)
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        state = {k: v.to("cpu") for k, v in hf.state_dict().items()}
        del hf
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        t = time.perf_counter()
        engine = build_engine(
            "none",
            dict(checkpoint_tensors(state)),
            model=tmp,
            device=device,
            dtype="bfloat16",
            max_model_len=args.prompt_len + args.output_len + 64,
            enforce_eager=args.eager,
            max_num_seqs=max(args.concurrency),
        )
        res["ours_init_s"] = time.perf_counter() - t
        res["ours_cuda_graphs"] = sorted(engine.runner.graphs)
        run_ours(engine, [rand_prompt(16)], 4)  # warm-up
        for n, prompts in loads.items():
            ours = res[f"ours_{n}"] = run_ours(engine, prompts, args.output_len)
            roof = res[f"roofline_{n}"]
            if ours.get("steady_step_ms_p50"):
                ours["pct_of_hbm_roofline"] = 100 * roof["step_ms_hbm"] / ours["steady_step_ms_p50"]
            peer = res.get(f"hf_generate_{n}", {})
            if peer.get("output_tok_s"):
                ours["x_hf_generate"] = ours["output_tok_s"] / peer["output_tok_s"]
            print(json.dumps({f"ours_{n}": ours}), flush=True)
        del engine, state
        gc.collect()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["kernel", "moe", "v3", "lite"]
    ap.add_argument("--parts", nargs="+", default=parts, choices=parts)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--peer-output-len", type=int, default=256, help="HF generate's new tokens (fewer to fit a device call)")
    ap.add_argument("--peer-repeats", type=int, default=1)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--lite-layers", type=int, default=27)
    ap.add_argument("--v3-layers", type=int, default=4)
    ap.add_argument("--v3-batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--v3-context", type=int, default=2048)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs in our engine")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    info = run_info(args)
    bandwidth = copy_bandwidth(args.device)
    info["copy_bandwidth_GB_s"] = bandwidth / 1e9
    print(json.dumps(info), flush=True)
    results: dict = {"info": info}

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))

    runners = {
        "kernel": lambda: bench_kernel(args),
        "moe": lambda: bench_moe(args),
        "v3": lambda: bench_v3(args, bandwidth),
        "lite": lambda: bench_lite(args, bandwidth),
    }
    failed = False
    for part in args.parts:
        t = time.perf_counter()
        try:
            results[part] = runners[part]()
        except Exception as e:  # the other parts still run and report
            import traceback

            traceback.print_exc()
            results[part] = {"error": f"{type(e).__name__}: {e}"[:500]}
            failed = True
        results[part + "_seconds"] = time.perf_counter() - t
        save()
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
