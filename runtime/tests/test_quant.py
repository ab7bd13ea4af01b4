"""FP8 weights (per output channel) and activations (per token): the CPU emulation is the
reference the CUDA path is tested against (tests/test_cuda.py). The quantization pass
(layers/quantize.py) applies them to a built model whose files know nothing of fp8."""

from __future__ import annotations

import ast
import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from inferd import LLM, SamplingParams
from inferd.config import EngineConfig
from inferd.layers.activation import SiluAndMul
from inferd.layers.embed_head import LMHead, VocabEmbedding
from inferd.layers.linear import Linear, MergedLinear
from inferd.layers.norm import RMSNorm
from inferd.layers.quant import FP8, QuantizedRows, UnscaledProduct, fp8_linear, quantize_rows, quantize_weight
from inferd.layers.quantize import Fp8Linear, Fp8RMSNorm, Fp8RotaryEmbedding, Fp8SiluAndMul, quantize_fp8
from inferd.server.config import ServerConfig
from inferd.testing import prefill_logits


def test_weight_quantization_error_is_within_e4m3_precision():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different size
    q, scale = quantize_weight(w)
    assert q.dtype == FP8 and scale.shape == (1, 64)
    back = q.float() * scale.view(-1, 1)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, plus the subnormal step.
    bound = w.abs() * 2**-4 + scale.view(-1, 1) * 2**-9
    assert (back - w).abs().le(bound + 1e-12).all()
    torch.testing.assert_close(back.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6, atol=0)  # each row's max is exact


def test_fp8_linear_is_close_to_the_full_precision_product():
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 512), torch.randn(256, 512) / 20, torch.randn(256)
    q, scale = quantize_weight(w)
    out = fp8_linear(x, q, scale, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert (out - ref).norm() / ref.norm() < 0.05
    # A wrong scale is not close: the check above can fail.
    wrong = fp8_linear(x, q, scale * 1.5, b)
    assert (wrong - ref).norm() / ref.norm() > 0.2


def test_fp8_linear_rows_do_not_depend_on_their_batch():
    torch.manual_seed(1)
    x, w = torch.randn(16, 128), torch.randn(64, 128)
    x[3] *= 1000  # an outlier token must not coarsen the others' quantization
    q, scale = quantize_weight(w)
    batch = fp8_linear(x, q, scale, None)
    xq, row_scales = quantize_rows(x)
    for i in range(16):
        alone_q, alone_scale = quantize_rows(x[i : i + 1])
        assert torch.equal(alone_q[0].float(), xq[i].float()) and torch.equal(alone_scale[0], row_scales[i])
        torch.testing.assert_close(fp8_linear(x[i : i + 1], q, scale, None)[0], batch[i], rtol=1e-5, atol=1e-5)
    assert row_scales.shape == (16, 1) and row_scales[3] > 100 * row_scales[0]


@pytest.fixture(scope="module")
def fp8_llm(llama_dir):
    return LLM(str(llama_dir), device="cpu", dtype="float32", quantization="fp8", cpu_kv_cache_bytes=1 << 25)


def test_the_engine_holds_fp8_weights_and_keeps_the_head_in_full_precision(fp8_llm):
    model = fp8_llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert linears and all(m.weight.dtype == FP8 for m in linears)
    assert not any(isinstance(m, Linear) for m in model.modules()), "a projection kept full-precision weights"
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_fp8_prefill_logits_stay_close_to_full_precision(fp8_llm, llama_dir):
    full = LLM(str(llama_dir), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 25)
    ids = list(range(5, 60))
    a, b = prefill_logits(fp8_llm, ids), prefill_logits(full, ids)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cosine.min() > 0.99, cosine.min()
    assert not torch.equal(a, b)  # really quantized


def test_fp8_greedy_tokens_alone_equal_inside_a_batch(fp8_llm):
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17, 90, 2, 33)]
    alone = [fp8_llm.generate([p], sp)[0].token_ids for p in prompts]
    together = [o.token_ids for o in fp8_llm.generate(prompts, sp)]
    assert together == alone


def test_unknown_quantization_is_refused_by_name(llama_dir):
    with pytest.raises(ValueError, match=r"quantization must be one of \['fp8'\] or none, got 'int4'"):
        EngineConfig(model=str(llama_dir), quantization="int4")
    with pytest.raises(ValueError, match="set dtype bfloat16"):
        EngineConfig(model=str(llama_dir), device="cuda", dtype="float16", quantization="fp8")
    assert ServerConfig(model="m", quantization="fp8").engine.quantization == "fp8"
    with pytest.raises(ValueError, match="quantization"):
        ServerConfig(model="m", quantization="int4")


def test_fp8_handoffs_between_fused_kernels_change_nothing(fp8_llm, llama_dir):
    # Norms and SiLU-and-multiply hand the projections quantized rows, and the projections hand
    # their unscaled products on: the same arithmetic as each layer doing its own (handoffs off).
    separate_llm = LLM(str(llama_dir), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 25)
    plan = quantize_fp8(separate_llm.engine.runner.model, handoffs=False)
    assert plan.fp8 and not plan.hands_product and not plan.hands_rows
    kinds = {}
    for llm in (fp8_llm, separate_llm):
        model = llm.engine.runner.model
        seen = kinds[llm] = []
        linears = [m for m in model.modules() if isinstance(m, Fp8Linear)]
        hooks = [
            m.register_forward_hook(lambda mod, args, out, seen=seen: seen.append((type(args[0]), type(out)))) for m in linears
        ]
        try:
            logits = prefill_logits(llm, list(range(3, 40)))
        finally:
            for h in hooks:
                h.remove()
        kinds[llm] = (set(seen), logits)
    assert kinds[fp8_llm][0] == {(QuantizedRows, UnscaledProduct), (torch.Tensor, UnscaledProduct)}  # o_proj: attention output
    assert kinds[separate_llm][0] == {(torch.Tensor, torch.Tensor)}
    assert torch.equal(kinds[fp8_llm][1], kinds[separate_llm][1])


# ---- quantization as a pass over a built model ---------------------------------------------------
INFERD = Path(__file__).resolve().parents[1] / "inferd"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


ARCHITECTURES = sorted(p for p in (INFERD / "models").glob("*.py") if p.name not in ("__init__.py", "config.py", "registry.py"))


@pytest.mark.parametrize("path", ARCHITECTURES, ids=lambda p: p.name)
def test_model_files_know_nothing_of_fp8(path):
    # A new architecture (DeepSeek-V2/V3 next) is written against plain layers: the quantization
    # pass alone knows formats, handoffs and which modules take part.
    source = path.read_text().lower()
    fp8_modules = ("inferd.layers.quant", "inferd.layers.fused.")  # fused.py, not fused_moe.py
    assert not [n for n in _imports(path) if n == "inferd.layers.fused" or n.startswith(fp8_modules)]
    assert "fp8" not in source and "quant" not in source


@pytest.mark.parametrize("path", sorted((INFERD / "layers").glob("*.py")), ids=lambda p: p.name)
def test_layers_import_nothing_from_the_engine(path):
    assert not [n for n in _imports(path) if n.startswith(("inferd.engine", "inferd.server"))]


def test_the_pass_swaps_the_projections_and_installs_the_handoffs(fp8_llm):
    model = fp8_llm.engine.runner.model
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert all(
            isinstance(m, Fp8Linear) and m.hands_product for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        )
        assert isinstance(attn.rotary_emb, Fp8RotaryEmbedding)  # finishes qkv_proj's product
        assert isinstance(mlp.act_fn, Fp8SiluAndMul) and mlp.act_fn.hands_rows  # finishes gate_up, quantizes for down
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            assert isinstance(norm, Fp8RMSNorm) and norm.hands_rows
    # The final norm finishes the last down_proj's product; its output is the model's result.
    assert isinstance(model.model.norm, Fp8RMSNorm) and not model.model.norm.hands_rows
    assert type(model.lm_head) is LMHead and type(model.model.embed_tokens) is VocabEmbedding


def test_a_model_built_without_the_pass_runs_in_its_own_dtype(llama_dir):
    llm = LLM(str(llama_dir), device="cpu", dtype="bfloat16", cpu_kv_cache_bytes=1 << 25)
    model = llm.engine.runner.model
    fp8_types = (Fp8Linear, Fp8RMSNorm, Fp8SiluAndMul, Fp8RotaryEmbedding)
    assert not [n for n, m in model.named_modules() if isinstance(m, fp8_types)]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    outputs = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: outputs.append(out)) for m in model.modules() if isinstance(m, Linear)
    ]
    try:
        logits = prefill_logits(llm, list(range(3, 20)))
    finally:
        for h in hooks:
            h.remove()
    assert logits.dtype == torch.bfloat16
    assert outputs and all(type(o) is torch.Tensor and o.dtype == torch.bfloat16 for o in outputs)


class MadeUpModel(nn.Module):
    """An architecture the pass has never seen: a norm read by two projections whose products meet
    in the model's own arithmetic, and a projection whose product is a norm's residual."""

    def __init__(self):
        super().__init__()
        self.embed = VocabEmbedding(64, 32)
        self.norm = RMSNorm(32)
        self.a, self.b = Linear(32, 32), Linear(32, 32, bias=True)
        self.post_norm = RMSNorm(32)
        self.up, self.act, self.down = MergedLinear(32, [48, 48]), SiluAndMul(), Linear(48, 32)
        self.final = RMSNorm(32)
        torch.manual_seed(0)
        for p in self.parameters():
            p.data.normal_(0, 0.3)

    def forward(self, input_ids, positions):
        e = self.embed(input_ids)
        h = self.norm(e)
        mixed = self.a(h) * torch.sigmoid(self.b(h))
        x, residual = self.post_norm(mixed, e)
        y = self.down(self.act(self.up(x)))
        out, _ = self.final(residual, y)
        return out


def test_the_pass_hands_on_formats_only_where_every_reader_takes_them():
    ids, positions = torch.arange(3, 40) % 64, torch.arange(37)
    with torch.inference_mode():
        full = MadeUpModel()(ids, positions)
        fused_model, separate_model = MadeUpModel(), MadeUpModel()
        plan = quantize_fp8(fused_model)
        quantize_fp8(separate_model, handoffs=False)
        fused, separate = fused_model(ids, positions), separate_model(ids, positions)
    assert plan.traced and plan.fp8 == ["a", "b", "up", "down"]
    # a and b: read by the model's own product; down: the final norm's residual, not its input.
    assert plan.hands_product == ["up"] and plan.finishes_product == ["act"]
    # norm: read by a and b alike (one set of rows for both).
    assert sorted(plan.hands_rows) == ["act", "norm", "post_norm"]
    assert type(fused_model.final) is RMSNorm
    assert torch.equal(fused, separate)
    assert torch.nn.functional.cosine_similarity(fused, full, dim=-1).min() > 0.99


class DataDependentModel(MadeUpModel):
    def forward(self, input_ids, positions):
        first = int(input_ids[0])  # a value the meta device does not have
        return super().forward(input_ids + first - first, positions)


def test_a_model_the_trace_cannot_run_gets_fp8_weights_without_handoffs(caplog):
    model = DataDependentModel()
    with caplog.at_level(logging.WARNING, logger="inferd.quantize"):
        plan = quantize_fp8(model)
    assert "could not be traced" in caplog.text and "without handoffs" in caplog.text
    assert not plan.traced and len(plan.fp8) == 4 and not plan.hands_product and not plan.hands_rows
    assert all(isinstance(getattr(model, n), Fp8Linear) for n in plan.fp8)
    with torch.inference_mode():
        assert torch.isfinite(model(torch.arange(3, 20), torch.arange(17))).all()


def test_the_pass_frees_each_full_precision_weight_as_it_goes():
    # The KV cache is sized from the free memory after the pass: a weight kept until the next
    # garbage collection (a parameter and its layer hold each other) would shrink it.
    model = MadeUpModel()
    old = {n: weakref.ref(getattr(model, n).weight) for n in ("a", "b", "up", "down")}
    old_bias = weakref.ref(model.b.bias)
    gc.disable()
    try:
        quantize_fp8(model)
        assert [n for n, ref in old.items() if ref() is not None] == []
    finally:
        gc.enable()
    assert model.b.bias is not old_bias() and torch.equal(model.b.bias, old_bias())  # the values, not the loader
