"""gpu_assess's sizing logic against hand-computed cases, its nvidia-smi XML parser, and the module
as Ansible runs it on a host without a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_assess", ROOT / "library" / "gpu_assess.py")
ga = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ga)

GIB = 1 << 30
H100 = [{"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559, "compute_capability": "9.0"}]
A100 = [{"name": "NVIDIA A100-SXM4-80GB", "memory_total_mib": 81920, "compute_capability": "8.0"}]
L4 = [{"name": "NVIDIA L4", "memory_total_mib": 23034, "compute_capability": "8.9"}]
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
LLAMA_70B = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def test_model_shape_by_hand():
    s = ga.model_shape(LLAMA_8B)
    # Per layer: attention 4096*128*(64+16) = 41,943,040; MLP 3*4096*14336 = 176,160,768; norms 8192.
    # Embedding + head 2*128256*4096 = 1,050,673,152; final norm 4096.
    assert s["params"] == 32 * (41_943_040 + 176_160_768 + 8192) + 1_050_673_152 + 4096 == 8_030_261_248
    assert s["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2 == 131_072
    assert ga.model_shape(LLAMA_70B)["kv_bytes_per_token"] == 2 * 80 * 8 * 128 * 2 == 327_680


# DeepSeek-V2-Lite's published config.json (the fields that size it) and V3's.
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 102400,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 1408,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "topk_method": "greedy",
    "tie_word_embeddings": False,
}
V3 = {
    **V2_LITE,
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "vocab_size": 129280,
    "q_lora_rank": 1536,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048,
    "first_k_dense_replace": 3,
    "topk_method": "noaux_tc",
    "num_nextn_predict_layers": 1,
}


def test_deepseek_v2_lite_shape_by_hand():
    s = ga.model_shape(V2_LITE)
    # Attention a layer: q 2048*16*192 = 6,291,456; kv_a 2048*576 + 512 (norm) = 1,180,160;
    # kv_b 512*16*256 = 2,097,152; o 16*128*2048 = 4,194,304: 13,763,072; + norms 4,096.
    attn = 6_291_456 + 1_180_160 + 2_097_152 + 4_194_304 + 4096
    # Layer 0 dense: 3*2048*10944 = 67,239,936. Layers 1-26: 64 experts of 3*2048*1408 = 8,650,752,
    # 2 shared, a router of 64*2048 = 131,072. Embedding and head 2*102400*2048, final norm 2048.
    expert, router, embed = 8_650_752, 131_072, 2 * 102_400 * 2048
    base = 27 * attn + 67_239_936 + 2048
    assert s["params"] == base + 26 * (router + 66 * expert) + embed == 15_706_484_224  # 15.7B
    # Active: 6 routed + 2 shared experts a layer, and the head; the embedding is one row looked up.
    assert s["active_params"] == base + 26 * (router + 8 * expert) + embed // 2 == 2_451_435_008  # 2.4B
    # The cache holds one latent (512 + 64 values) a token and layer, in 16 bits.
    assert s["kv_bytes_per_token"] == 27 * 576 * 2 == 31_104


def test_deepseek_v3_shape_matches_the_published_sizes():
    s = ga.model_shape(V3)
    assert s["params"] / 1e9 == pytest.approx(671, abs=0.5)  # 671B without the MTP layer
    assert s["active_params"] / 1e9 == pytest.approx(37, abs=0.5)
    assert s["kv_bytes_per_token"] == 61 * 576 * 2 == 70_272


def test_deepseek_params_equal_transformers_count():
    """transformers' own model of the V2-Lite shape, built on the meta device (in a subprocess:
    torch does not import under ansible's module patches)."""
    pytest.importorskip("transformers")
    fields = {k: v for k, v in V2_LITE.items() if k != "architectures"}
    code = (
        "import json, sys, torch, transformers\n"
        "with torch.device('meta'):\n"
        "    m = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**json.loads(sys.argv[1])))\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, json.dumps(fields)], capture_output=True, text=True, check=True)
    assert ga.model_shape(V2_LITE)["params"] == int(r.stdout.split()[-1])


def test_v2_lite_fits_one_h200_in_bf16_with_its_latent_cache():
    h200 = [{"name": "NVIDIA H200", "memory_total_mib": 143771, "compute_capability": "9.0"}]
    s = ga.model_shape(V2_LITE)
    r = ga.assess(h200, s["params"], s["kv_bytes_per_token"], "bf16", 8192, 64, 0.95, 2.0)
    assert r["fits"] and r["recommended_quantization"] == "bf16"
    assert r["need_gib"]["kv_cache"] == pytest.approx(31_104 * 8192 * 64 / GIB, abs=0.01)  # 15.2 GiB
    # Sized as expanded K/V (16 heads x (192 + 128)) the same load would need 9x the cache.
    assert 27 * 16 * (192 + 128) * 2 / s["kv_bytes_per_token"] > 8.8


def test_the_v2_lite_inventory_example_matches_the_model_and_the_runtime():
    example = yaml.safe_load((ROOT / "inventory/examples/deepseek-v2-lite.yml").read_text())
    s = ga.model_shape(V2_LITE)
    assert example["assess_params_billion"] == round(s["params"] / 1e9, 2)
    assert example["assess_kv_bytes_per_token"] == s["kv_bytes_per_token"]
    # Every setting is a variable the runtime role or the assess play reads.
    defaults = yaml.safe_load((ROOT / "roles/inference_runtime/defaults/main.yml").read_text())
    assess_play = (ROOT / "playbooks/assess.yml").read_text()
    for key in example:
        assert key in defaults or (key.startswith("assess_") and key in assess_play), key
    # The latent cache has no fp8 form in the runtime, and the runtime reads the architecture.
    assert example["inference_runtime_kv_cache_dtype"] == "auto"
    spec = importlib.util.spec_from_file_location("model_config", ROOT / "runtime/inferd/models/config.py")
    model_config = importlib.util.module_from_spec(spec)
    sys.modules["model_config"] = model_config  # dataclasses resolve the module by name
    spec.loader.exec_module(model_config)
    cfg = model_config.parse_model_config(V2_LITE)
    assert cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim == 576


def run_module(tmp_path, model_config: dict) -> tuple[dict, str]:
    """The module as Ansible runs it (a subprocess fed ANSIBLE_MODULE_ARGS, check mode) on a host
    whose PATH has no nvidia-smi: (its JSON result, its stderr)."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(model_config))
    args = json.dumps({"ANSIBLE_MODULE_ARGS": {"model_config": str(cfg), "_ansible_check_mode": True}})
    r = subprocess.run(
        [sys.executable, str(ROOT / "library" / "gpu_assess.py")],
        input=args,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    return json.loads(r.stdout), r.stderr


def test_module_reports_the_model_sizes(tmp_path):
    out, _ = run_module(tmp_path, V2_LITE)
    assert out["model"] == {"params": 15_706_484_224, "active_params": 2_451_435_008, "kv_bytes_per_token": 31_104}


def test_need_by_hand():
    n = ga.need(8e9, 131_072, "bf16", context=8192, concurrency=16, overhead_gib=2.0)
    assert n["weights"] == pytest.approx(16e9 / GIB)
    assert n["kv_cache"] == pytest.approx(16.0)  # 131072 B x 131072 tokens = 16 GiB
    assert n["total"] == pytest.approx(16e9 / GIB + 18.0)
    assert ga.need(8e9, 0, "fp8", 1, 1, 0)["weights"] == pytest.approx(8e9 / GIB)


def shape(cfg):
    s = ga.model_shape(cfg)
    return s["params"], s["kv_bytes_per_token"]


def test_8b_fits_an_80gb_card_and_70b_needs_fp8():
    r = ga.assess(H100, *shape(LLAMA_8B), "bf16", 8192, 16, 0.95, 2.0)
    assert r["fits"] and r["recommended_quantization"] == "bf16"
    assert r["usable_gib"] == pytest.approx(81559 / 1024 * 0.95, abs=0.01)
    assert r["headroom_gib"] == pytest.approx(r["usable_gib"] - r["need_gib"]["total"], abs=0.02)
    r = ga.assess(H100, *shape(LLAMA_70B), "bf16", 4096, 1, 0.95, 2.0)
    assert not r["fits"] and r["headroom_gib"] < 0
    assert r["recommended_quantization"] == "fp8"  # 65.7 GiB weights + 1.25 KV + 2 < 75.7
    assert ga.assess(H100, *shape(LLAMA_70B), "fp8", 4096, 1, 0.95, 2.0)["fits"]
    assert "does NOT fit" in ga.assess(H100, *shape(LLAMA_70B), "bf16", 4096, 1, 0.95, 2.0)["msg"]


def test_seed_matrix_7_to_13b_on_24gb_cards():
    thirteen = {
        **LLAMA_8B,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
    }
    assert ga.assess(L4, *shape(LLAMA_8B), "bf16", 4096, 1, 0.95, 2.0)["fits"] is True  # 15.0 + 0.5 + 2 <= 21.4 GiB
    r = ga.assess(L4, *shape(thirteen), "bf16", 4096, 1, 0.95, 2.0)
    assert not r["fits"] and r["recommended_quantization"] == "fp8"  # the L4 is Ada (8.9)


def test_fp8_is_recommended_only_on_compute_capability_8_9_or_newer():
    # 70B at bf16 does not fit 80 GB; at fp8 it would. Hopper (9.0) gets fp8:
    r = ga.assess(H100, *shape(LLAMA_70B), "bf16", 4096, 1, 0.95, 2.0)
    assert r["fp8_supported"] is True and r["recommended_quantization"] == "fp8"
    # Ampere (8.0) has no fp8 tensor cores: nothing the runtime serves fits, and it says why.
    r = ga.assess(A100, *shape(LLAMA_70B), "bf16", 4096, 1, 0.95, 2.0)
    assert r["fp8_supported"] is False and r["recommended_quantization"] is None and not r["fits"]
    assert "no quantization fits one GPU" in r["msg"] and "compute capability 8.0" in r["msg"]
    # Asked for fp8 outright, Ampere does not fit it either, whatever its memory.
    r = ga.assess(A100, *shape(LLAMA_8B), "fp8", 4096, 1, 0.95, 2.0)
    assert not r["fits"] and r["recommended_quantization"] is None and "has no fp8" in r["msg"]
    # One Ampere card among Hoppers rules fp8 out for the host; an unknown capability is not assumed.
    assert ga.fp8_supported(H100 + A100) is False
    assert ga.fp8_supported(H100 + [{"name": "?", "memory_total_mib": 81559}]) is None
    r = ga.assess([{**H100[0], "compute_capability": None}], *shape(LLAMA_70B), "bf16", 4096, 1, 0.95, 2.0)
    assert r["recommended_quantization"] is None and "unknown" in r["msg"]
    # Where bf16 fits, it is what is recommended on any card: fp8 only when bf16 does not fit.
    for gpus in (H100, A100):
        assert ga.assess(gpus, *shape(LLAMA_8B), "bf16", 4096, 1, 0.95, 2.0)["recommended_quantization"] == "bf16"


def test_only_formats_the_runtime_serves_are_recommended():
    runtime_config = (ROOT / "runtime" / "inferd" / "config.py").read_text()
    assert 'Quantization = Literal["fp8"]' in runtime_config  # what the runtime serves besides its dtype
    assert set(ga.RECOMMEND_ORDER) == {"bf16", "fp8"} and set(ga.LADDER) <= {"bf16", "fp16", "fp8"}
    # A model too big even for fp8 on an 80 GB card: int4 would fit, and is never offered.
    huge = {**LLAMA_70B, "num_hidden_layers": 120}
    assert ga.need(*shape(huge), "fp8", 4096, 1, 2.0)["total"] > 81559 / 1024 * 0.95
    r = ga.assess(H100, *shape(huge), "bf16", 4096, 1, 0.95, 2.0)
    assert r["recommended_quantization"] is None and "no quantization fits one GPU" in r["msg"]
    assert "int4" not in r["msg"] and "int8" not in r["msg"]


def test_compute_capability_from_the_nvidia_smi_query():
    out = "00000000:19:00.0, 9.0\n00000000:3B:00.0, 8.0\n00000000:5D:00.0, [N/A]\n"
    assert ga.parse_compute_caps(out) == {"00000000:19:00.0": "9.0", "00000000:3b:00.0": "8.0"}


def test_no_gpu_is_a_clear_result_not_an_error():
    r = ga.assess([], 8e9, 131_072, "bf16", 4096, 1, 0.95, 2.0)
    assert r["fits"] is False and r["recommended_quantization"] is None
    assert "no NVIDIA GPU found" in r["msg"]


NVIDIA_SMI_XML = """<?xml version="1.0" ?>
<nvidia_smi_log>
  <driver_version>580.159.04</driver_version>
  <cuda_version>13.0</cuda_version>
  <attached_gpus>1</attached_gpus>
  <gpu id="00000000:19:00.0">
    <product_name>NVIDIA H100 80GB HBM3</product_name>
    <persistence_mode>Enabled</persistence_mode>
    <mig_mode><current_mig>Disabled</current_mig><pending_mig>Disabled</pending_mig></mig_mode>
    <uuid>GPU-00000000-1111-2222-3333-444444444444</uuid>
    <pci>
      <pci_gpu_link_info>
        <pcie_gen><max_link_gen>5</max_link_gen><current_link_gen>5</current_link_gen></pcie_gen>
        <link_widths><max_link_width>16x</max_link_width><current_link_width>16x</current_link_width></link_widths>
      </pci_gpu_link_info>
    </pci>
    <fb_memory_usage><total>81559 MiB</total><used>4 MiB</used><free>81225 MiB</free></fb_memory_usage>
    <ecc_mode><current_ecc>Enabled</current_ecc><pending_ecc>Enabled</pending_ecc></ecc_mode>
    <ecc_errors><volatile><sram_uncorrectable>0</sram_uncorrectable><dram_uncorrectable>0</dram_uncorrectable></volatile></ecc_errors>
  </gpu>
</nvidia_smi_log>
"""


def test_parse_nvidia_smi_xml():
    (gpu,) = ga.parse_nvidia_smi_xml(NVIDIA_SMI_XML)
    assert gpu["name"] == "NVIDIA H100 80GB HBM3" and gpu["memory_total_mib"] == 81559
    assert gpu["driver_version"] == "580.159.04" and gpu["cuda_version"] == "13.0"
    assert (gpu["pcie_generation"], gpu["pcie_width"]) == (5, 16)
    assert gpu["ecc_mode"] == "Enabled" and gpu["ecc_errors_uncorrected"] == 0
    assert gpu["persistence_mode"] == "Enabled" and gpu["mig_mode"] == "Disabled"


def test_module_on_a_host_without_gpu(tmp_path):
    out, stderr = run_module(tmp_path, LLAMA_8B)
    assert out["changed"] is False and out["gpus"] == [] and out["fits"] is False
    assert "no NVIDIA GPU found" in out["msg"] and "Traceback" not in stderr


def test_parse_nvidia_smi_xml_recorded_on_the_h200():
    """`nvidia-smi -q -x` as recorded on the lent H200 (scripts/device-provision-check.sh)."""
    xml = (Path(__file__).parent / "fixtures" / "nvidia-smi-q-h200.xml").read_text()
    (gpu,) = ga.parse_nvidia_smi_xml(xml)
    assert gpu["name"] == "NVIDIA H200" and gpu["memory_total_mib"] == 143771
    assert gpu["driver_version"] == "580.159.04" and gpu["cuda_version"] == "13.0"
    assert (gpu["pcie_generation"], gpu["pcie_width"]) == (5, 16)
    assert gpu["ecc_mode"] == "Enabled" and gpu["ecc_errors_uncorrected"] == 0
    assert gpu["persistence_mode"] == "Enabled" and gpu["mig_mode"] == "Disabled"
    assert gpu["compute_capability"] is None  # the XML does not carry it; discover() asks nvidia-smi's query form
    r = ga.assess([gpu], 70.55e9, 327_680, "bf16", 4096, 1, 0.95, 2.0)
    assert not r["fits"] and r["recommended_quantization"] is None  # fp8 is not assumed
    gpu["compute_capability"] = "9.0"
    r = ga.assess([gpu], 70.55e9, 327_680, "bf16", 4096, 1, 0.95, 2.0)
    assert not r["fits"] and r["recommended_quantization"] == "fp8"


def test_documentation_blocks_parse():
    """`ansible-doc -M library gpu_assess` is the user's manual: its YAML must load."""
    doc = yaml.safe_load(ga.DOCUMENTATION)
    assert doc["options"]["dtype"]["choices"] == ga.LADDER
    assert yaml.safe_load(ga.EXAMPLES) and "recommended_quantization" in yaml.safe_load(ga.RETURN)
