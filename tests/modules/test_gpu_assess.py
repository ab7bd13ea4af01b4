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
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA_8B))
    args = json.dumps({"ANSIBLE_MODULE_ARGS": {"model_config": str(cfg), "_ansible_check_mode": True}})
    r = subprocess.run(
        [sys.executable, str(ROOT / "library" / "gpu_assess.py")],
        input=args,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    out = json.loads(r.stdout)
    assert out["changed"] is False and out["gpus"] == [] and out["fits"] is False
    assert "no NVIDIA GPU found" in out["msg"] and "Traceback" not in r.stderr


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
