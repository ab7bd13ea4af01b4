"""DeepSeek-V2 and -V3 (V2-Lite, V3, R1): Multi-head Latent Attention over a paged cache of the
compressed latent, and a mixture of experts with grouped routing.

Read against deepseek-ai/DeepSeek-V3 `inference/model.py` (MLA, Gate, MoE) and DeepSeek-V2's
`modeling_deepseek.py`; transformers' `deepseek_v2`/`deepseek_v3` are the test reference.

The cache holds, per token and layer, the normalised latent c_kv (kv_lora_rank values) and the
rotated shared rope key (qk_rope_head_dim): 576 values for V2/V3, against heads x (192 + 128) =
40,960 for V3's expanded K/V. Prefill up-projects the latent to K/V (the expanded form, one
matmul per chunk); decode never does: W_UK is folded into the query and W_UV applied to the
attention output (the absorbed form), so a decode step reads only the latent cache.

The hot pieces are plain functions with fixed interfaces (`mla_decode_reference`, `route`,
`fused_moe_ref`): the readable CPU reference, which CUDA kernels replace one for one.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from inferd.layers.activation import SiluAndMul
from inferd.layers.attention import gather_context
from inferd.layers.context import get_context
from inferd.layers.fused_moe import fused_moe
from inferd.layers.linear import Linear, MergedLinear, default_weight_loader
from inferd.layers.mla_decode import mla_decode, mla_decode_fits, mla_decode_reference
from inferd.layers.norm import RMSNorm
from inferd.models.config import MLAConfig, ModelConfig, MoEConfig
from inferd.models.decoder import CausalLM, PreNormDecoderLayer


# ---- rotary embedding with yarn -----------------------------------------------------------------
def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_parameters(dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, factor on cos/sin) for the rope part of the heads; yarn blends
    interpolated and extrapolated frequencies over a ramp of dimensions (YaRN, section 3)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not scaling or scaling.get("rope_type") != "yarn":
        return inv_freq, 1.0
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, float(attention_factor)


def softmax_scale(mla: MLAConfig, scaling: dict | None) -> float:
    """1/sqrt(qk head dim), times yarn's mscale squared when `mscale_all_dim` is set: the
    attention logits grow with the stretched context, as in the reference's MLA.__init__."""
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    if scaling and scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
        m = yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale *= m * m
    return scale


class DeepseekRotary(nn.Module):
    def __init__(self, dim: int, max_position: int, theta: float, scaling: dict | None, interleave: bool):
        super().__init__()
        inv_freq, attention_factor = rope_parameters(dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * attention_factor, persistent=False)
        self.interleave = interleave

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, ..., dim] rotated. DeepSeek's checkpoints pair dimensions (0,1), (2,3), ...;
        the result keeps that layout. Queries and keys only meet in dot products, so any layout
        used for both gives the same scores."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        cos, sin = self.cos[positions].view(shape).to(x.dtype), self.sin[positions].view(shape).to(x.dtype)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---- Multi-head Latent Attention ----------------------------------------------------------------
class UpProjection(nn.Module):
    """kv_b_proj: latent -> per-head no-rope key and value. Not a `Linear`: decode reads its
    weight as the two absorbed matrices, so passes that rewrite linear layers must leave it as it is."""

    def __init__(self, kv_lora_rank: int, num_heads: int, nope: int, v: int):
        super().__init__()
        self.num_heads, self.nope, self.v = num_heads, nope, v
        self.weight = nn.Parameter(torch.empty(num_heads * (nope + v), kv_lora_rank), requires_grad=False)
        self.weight.weight_loader = lambda p, t, shard_id=None: default_weight_loader(p, t)

    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[L, kv_lora] -> k_nope [L, H, nope], v [L, H, v]."""
        kv = F.linear(latent, self.weight).view(latent.shape[0], self.num_heads, self.nope + self.v)
        return kv.split([self.nope, self.v], dim=-1)

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, kv_lora] and W_UV [H, v, kv_lora]."""
        w = self.weight.view(self.num_heads, self.nope + self.v, -1)
        return w[:, : self.nope], w[:, self.nope :]


class MLAttention(nn.Module):
    """Holds its layer's latent cache (bound by the model runner) like `Attention` holds K/V."""

    def __init__(self, cfg: ModelConfig, max_position: int):
        super().__init__()
        mla = cfg.mla
        self.num_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        qk_dim = self.nope + self.rope
        hidden, bias = cfg.hidden_size, cfg.attention_bias
        if mla.q_lora_rank is None:
            self.q_proj = Linear(hidden, self.num_heads * qk_dim)
        else:
            self.q_a_proj = Linear(hidden, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(mla.q_lora_rank, self.num_heads * qk_dim)
        self.kv_a_proj_with_mqa = Linear(hidden, mla.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = UpProjection(mla.kv_lora_rank, self.num_heads, self.nope, self.v_dim)
        self.o_proj = Linear(self.num_heads * self.v_dim, hidden, bias=bias)
        self.rotary_emb = DeepseekRotary(self.rope, max_position, cfg.rope_theta, cfg.rope_scaling, mla.rope_interleave)
        self.scale = softmax_scale(mla, cfg.rope_scaling)
        self.latent_cache = torch.tensor([])  # bound by the model runner
        self.use_triton = False

    # The model runner sizes and binds caches through these two (`Attention` has the same pair).
    def kv_cache_layout(self, dtype: torch.dtype) -> tuple[int, tuple[int, ...]]:
        """(cache tensors per layer, shape of one token's entry): one latent of kv_lora + rope."""
        if dtype.itemsize == 1:
            raise ValueError(
                "a one-byte KV cache (kv_cache_dtype) is not supported for the latent cache of Multi-head Latent Attention "
                "(DeepSeek V2/V3): use kv_cache_dtype auto (the latent is already 1/70 of expanded K/V)"
            )
        return 1, (self.kv_lora_rank + self.rope,)

    def bind_kv_cache(self, latent_cache: torch.Tensor) -> None:
        self.latent_cache = latent_cache

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        tokens = hidden.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q_nope, q_rope = q.view(tokens, self.num_heads, -1).split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        q_rope = self.rotary_emb(positions, q_rope)
        k_rope = self.rotary_emb(positions, k_rope)
        if self.latent_cache.numel():
            entry = torch.cat((latent, k_rope), dim=-1).to(self.latent_cache.dtype)
            self.latent_cache.view(-1, entry.shape[-1]).index_copy_(0, ctx.slot_mapping, entry)
        if ctx.is_prefill:
            out = self._prefill(q_nope, q_rope, latent, k_rope, ctx)
        else:
            out = self._decode(q_nope, q_rope, ctx)
        return self.o_proj(out.flatten(1))

    def _prefill(self, q_nope, q_rope, latent, k_rope, ctx) -> torch.Tensor:
        """Expanded form, per sequence: a chunk after cached context up-projects the cached
        latents as well (prefix-cache hits and chunked prefill read the same cache decode does)."""
        q = torch.cat((q_nope, q_rope), dim=-1)
        out = q.new_empty(q.shape[0], self.num_heads, self.v_dim)
        start = 0
        for i, (q_len, ctx_len) in enumerate(zip(ctx.query_lens, ctx.context_lens_list)):
            if ctx_len == q_len:
                c, kr = latent[start : start + q_len], k_rope[start : start + q_len]
            else:
                entries = gather_context(self.latent_cache, ctx.block_tables[i], ctx_len).to(q.dtype)
                c, kr = entries.split([self.kv_lora_rank, self.rope], dim=-1)
            k_nope, v = self.kv_b_proj.expand(c)
            k = torch.cat((k_nope, kr[:, None, :].expand(-1, self.num_heads, -1)), dim=-1)
            qs = q[start : start + q_len].transpose(0, 1)[None]
            ks, vs = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            if ctx_len == q_len:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale)
            else:
                qpos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
                mask = torch.arange(ctx_len, device=q.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale)
            out[start : start + q_len] = o[0].transpose(0, 1)
            start += q_len
        return out

    def _decode(self, q_nope, q_rope, ctx) -> torch.Tensor:
        w_uk, w_uv = self.kv_b_proj.absorbed()
        q_latent = torch.einsum("bhn,hnc->bhc", q_nope, w_uk)
        decode = mla_decode if q_latent.is_cuda and mla_decode_fits(self.kv_lora_rank, self.rope) else mla_decode_reference
        out_latent = decode(q_latent, q_rope.contiguous(), self.latent_cache, ctx.block_tables, ctx.context_lens, self.scale)
        return torch.einsum("bhc,hvc->bhv", out_latent, w_uv)


# ---- mixture of experts -------------------------------------------------------------------------
def route(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, moe: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] (float32) -> (topk_weights [T, k] float32, topk_ids [T, k] int64),
    as DeepSeek's Gate: the bias (noaux_tc) only chooses; group scores are the top-2 sum of the
    biased scores (noaux_tc) or the best score (group_limited_greedy); experts outside the
    `topk_group` best groups are masked; weights are the unbiased scores of the chosen experts,
    normalised when `norm_topk_prob`, times `routed_scaling_factor`."""
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if moe.scoring_func == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if moe.topk_method != "greedy" and moe.n_group > 1:
        grouped = choice.view(choice.shape[0], moe.n_group, -1)
        if moe.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        best = group_scores.topk(moe.topk_group, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, best, False)
        choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
    ids = choice.topk(moe.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, ids)
    if moe.norm_topk_prob and moe.num_experts_per_tok > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * moe.routed_scaling_factor, ids


def fused_moe_ref(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """sum over a token's chosen experts of weight * down(silu(gate(x)) * up(x)).
    hidden [T, D], w13 [E, 2I, D] (gate rows first), w2 [E, D, I], topk_weights [T, k] float32,
    topk_ids [T, k]. Tokens sorted by expert, one pair of matmuls per expert hit."""
    k = topk_ids.shape[1]
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    token_of = order // k
    weight_of = topk_weights.flatten()[order]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        rows = token_of[start : start + count]
        gate, up = F.linear(hidden[rows], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, rows, y.float() * weight_of[start : start + count, None])
        start += count
    return out.to(hidden.dtype)


class DeepseekMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Experts(nn.Module):
    """The routed experts' weights stacked: w13 [E, 2I, D] (gate then up), w2 [E, D, I]. A
    checkpoint's per-expert tensors load with shard id (expert, 'gate' | 'up' | 'down')."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        # On CUDA sorted by expert on the device and grouped GEMMs: no host sync, graph-captured.
        moe = fused_moe if x.is_cuda else fused_moe_ref
        return moe(x, self.w13, self.w2, topk_weights, topk_ids)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        expert, which = shard_id
        target = param.data[expert]
        if which != "down":
            size = self.intermediate_size
            target = target.narrow(0, 0 if which == "gate" else size, size)
        default_weight_loader(target, loaded)


class DeepseekMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = self.moe_config = cfg.moe
        # The router runs in float32 (as the reference keeps gate.weight): near-equal scores must
        # pick the same experts whatever the model's dtype.
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(
            torch.empty(moe.n_routed_experts, cfg.hidden_size, dtype=torch.float32), requires_grad=False
        )
        if moe.topk_method == "noaux_tc":
            self.gate.e_score_correction_bias = nn.Parameter(
                torch.zeros(moe.n_routed_experts, dtype=torch.float32), requires_grad=False
            )
        self.experts = Experts(moe.n_routed_experts, cfg.hidden_size, moe.moe_intermediate_size)
        self.shared_experts = (
            DeepseekMLP(cfg.hidden_size, moe.moe_intermediate_size * moe.n_shared_experts) if moe.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate.weight)
        weights, ids = route(logits, getattr(self.gate, "e_score_correction_bias", None), self.moe_config)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


# ---- the network --------------------------------------------------------------------------------
class DeepseekDecoderLayer(PreNormDecoderLayer):
    def __init__(self, cfg: ModelConfig, index: int, max_position: int):
        super().__init__()
        self.self_attn = MLAttention(cfg, max_position)
        if cfg.moe.is_moe_layer(index):
            self.mlp = DeepseekMoE(cfg)
        else:
            self.mlp = DeepseekMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


_EXPERT_TENSOR = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PARAM = {"gate_proj": ("w13", "gate"), "up_proj": ("w13", "up"), "down_proj": ("w2", "down")}


class DeepseekV2ForCausalLM(CausalLM):
    # checkpoint name fragment -> (fused parameter fragment, shard id): dense and shared MLPs
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    ignored_checkpoint_tensors = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: ModelConfig, max_position: int):
        super().__init__(cfg, (DeepseekDecoderLayer(cfg, i, max_position) for i in range(cfg.num_hidden_layers)))
        # The multi-token-prediction layers (V3: model.layers.61.*) are not run: skipped at load.
        mtp = range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
        self.ignored_checkpoint_prefixes = tuple(f"model.layers.{i}." for i in mtp)
        # Checkpoint weights in scaled blocks (V3/R1's config.json says [128, 128]): the loader and
        # the runner read it here.
        self.weight_block_size = cfg.weight_block_size

    def checkpoint_target(self, name: str):
        """A routed expert's tensor -> (stacked parameter, (expert, part)); None for the rest."""
        m = _EXPERT_TENSOR.match(name)
        if m is None:
            return None
        param, part = _EXPERT_PARAM[m[3]]
        return f"{m[1]}.{param}", (int(m[2]), part)

    def attention_layers(self) -> list[MLAttention]:
        return [layer.self_attn for layer in self.model.layers]


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """The V2 network; what differs (sigmoid scores, the correction bias, noaux_tc grouping, the
    MTP layer, block-scaled checkpoints) is in the config."""
