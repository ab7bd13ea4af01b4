#!/usr/bin/python
# Copyright: inferd contributors. Apache-2.0.
"""gpu_assess: what GPUs a host has, and whether a model fits on them."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gpu_assess
short_description: Inventory NVIDIA GPUs and decide whether a model fits
description:
  - Reads every NVIDIA GPU on the host through nvidia-ml-py (NVML), or by parsing
    C(nvidia-smi -q -x) when the Python bindings are missing, including name, memory, compute
    capability, driver and CUDA versions, ECC mode and error counts, persistence mode, PCIe
    generation and width, MIG mode, and the GPU's NUMA node and local CPU list. Without the
    Python bindings the compute capability comes from C(nvidia-smi --query-gpu=compute_cap).
  - Given a model (parameter count, or a C(config.json) on the host), a dtype, a context length
    and a concurrency, computes weights + KV cache + overhead against the memory of one GPU and
    returns go/no-go, the headroom, and the lowest-loss precision the inferd runtime serves that
    fits, bf16 (no quantization) then fp8. fp8 is recommended only where every GPU has compute
    capability 8.9 or newer (Ada, Hopper and later); where neither fits the result says no
    quantization fits.
  - DeepSeek-V2/V3 configs (Multi-head Latent Attention, mixture of experts) are sized as the
    runtime serves them (all experts' weights in memory, a KV cache of one compressed latent per
    token and layer of kv_lora_rank + qk_rope_head_dim values), and the active parameters reported.
  - Changes nothing on the host; safe in check mode.
  - On a host without an NVIDIA GPU it returns C(gpus=[]), C(fits=false) and a message that says
    so; it does not fail. The play decides (see C(playbooks/assess.yml)).
version_added: "0.1.0"
author: inferd contributors
options:
  model_config:
    description: Path on the host of the model's Hugging Face C(config.json); sizes are read from it.
    type: path
  params_billion:
    description: Parameter count in billions, when there is no config.json. Layer/KV sizes then come from I(kv_bytes_per_token).
    type: float
  kv_bytes_per_token:
    description: KV-cache bytes per token at I(dtype), when there is no config.json (2 x layers x kv_heads x head_dim x bytes).
    type: int
  dtype:
    description:
      - Precision to check first (the runtime serves bf16/fp16 unquantized, and fp8). The
        recommendation walks down from here (bf16, then fp8).
      - fp8 on a GPU older than compute capability 8.9 does not fit, whatever the memory.
    type: str
    choices: [bf16, fp16, fp8]
    default: bf16
  context_length:
    description: Tokens per sequence (prompt + output) to reserve KV cache for.
    type: int
    default: 4096
  concurrency:
    description: Sequences served at once.
    type: int
    default: 1
  gpu_memory_utilization:
    description: Fraction of each GPU's memory the runtime may use.
    type: float
    default: 0.95
  overhead_gib:
    description: CUDA context, activations and graphs, in GiB.
    type: float
    default: 2.0
requirements:
  - nvidia-ml-py (optional; C(nvidia-smi) is the fallback)
notes:
  - The KV cache is kept in 16 bits whatever the weight quantization.
"""

EXAMPLES = r"""
- name: Assess the GPUs for DeepSeek-R1-Distill-Llama-8B
  gpu_assess:
    model_config: /var/lib/inferd/models/current/config.json
    context_length: 8192
    concurrency: 16
  register: assessment

- name: Assess DeepSeek-V2-Lite (15.7B parameters, 2.4B active, a 31,104-byte latent per token)
  gpu_assess:
    model_config: /var/lib/inferd/models/current/config.json
    context_length: 8192
    concurrency: 64

- name: Assess a 70B model by size alone, served in fp8
  gpu_assess:
    params_billion: 70.6
    kv_bytes_per_token: 327680
    dtype: fp8
"""

RETURN = r"""
gpus:
  description: One entry per GPU.
  returned: always
  type: list
  elements: dict
  sample:
    - index: 0
      name: NVIDIA H100 80GB HBM3
      memory_total_mib: 81559
      compute_capability: "9.0"
      driver_version: "580.159.04"
      cuda_version: "13.0"
      ecc_mode: Enabled
      ecc_errors_uncorrected: 0
      persistence_mode: Enabled
      pcie_generation: 5
      pcie_width: 16
      mig_mode: Disabled
      numa_node: 0
      local_cpus: 0-51,104-155
source:
  description: Where the GPU facts came from (nvml, nvidia-smi, or none).
  returned: always
  type: str
model:
  description: >-
    The model's sizes: C(params) (all), C(active_params) (read per token: a mixture of experts
    reads only its chosen experts) and C(kv_bytes_per_token) (16-bit). Active is null when the
    model was given by size alone.
  returned: always
  type: dict
  sample: {params: 15706484224, active_params: 2451435008, kv_bytes_per_token: 31104}
fits:
  description: Whether the model fits one GPU at I(dtype) (and, for fp8, the GPUs support fp8).
  returned: always
  type: bool
headroom_gib:
  description: Usable memory minus what the model needs at I(dtype), in GiB (negative when it does not fit).
  returned: when a GPU was found
  type: float
need_gib:
  description: Weights, KV cache, overhead and their total at I(dtype), in GiB.
  returned: when a GPU was found
  type: dict
recommended_quantization:
  description: >-
    The lowest-loss precision the runtime serves (from I(dtype) down: bf16, fp8) that fits, or
    null if none does. fp8 only where every GPU has compute capability 8.9 or newer.
  returned: always
  type: str
recommended_tensor_parallel_size:
  description: >-
    GPUs to split the model over at I(dtype) (the runtime's inference_runtime_tensor_parallel_size):
    1 where one GPU holds it, else the smallest of 2, 4, 8 that this host has, that divides the
    model's attention and KV heads (when I(model_config) gives them) and whose per-GPU share of the
    weights and KV cache fits; null when none does.
  returned: when a GPU was found
  type: int
fp8_supported:
  description: Whether every GPU has compute capability 8.9 or newer (null when a GPU's is unknown).
  returned: when a GPU was found
  type: bool
msg:
  description: A readable summary.
  returned: always
  type: str
"""

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

GIB = 1 << 30
# What the inferd runtime serves (runtime/inferd/config.py: the model's 16-bit dtype, or fp8):
# a recommendation the runtime cannot serve (int8, int4) would only move the failure to its start.
LADDER = ["bf16", "fp16", "fp8"]
BYTES_PER_PARAM = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0}
RECOMMEND_ORDER = ["bf16", "fp8"]  # loss order: 16-bit exact, then fp8
# fp8 tensor cores (e4m3 matmuls) start with Ada (8.9) and Hopper (9.0).
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)


def _capability(text) -> tuple | None:
    try:
        major, minor = str(text).split(".")
        return int(major), int(minor)
    except (ValueError, AttributeError):
        return None


def fp8_supported(gpus: list) -> bool | None:
    """True when every GPU has fp8 tensor cores, False when one lacks them, None when one's is unknown."""
    caps = [_capability(g.get("compute_capability")) for g in gpus]
    if any(c is not None and c < FP8_MIN_COMPUTE_CAPABILITY for c in caps):
        return False
    return None if any(c is None for c in caps) else True


# ---- model sizing --------------------------------------------------------------------------
def model_shape(config: dict) -> dict:
    """Parameters (all, and active: what one token's forward pass reads, less the one embedding
    row it looks up) and KV-cache bytes per token (16-bit) from a Hugging Face config."""
    if config.get("kv_lora_rank"):
        return deepseek_shape(config)
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    attn = h * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * h * inter
    embed = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    params = layers * (attn + mlp + 2 * h) + embed + h
    active = params - (0 if config.get("tie_word_embeddings") else vocab * h)
    return {"params": params, "active_params": active, "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * 2}


def deepseek_shape(config: dict) -> dict:
    """DeepSeek-V2/V3 (MLA and a mixture of experts). The cache holds one latent per token and
    layer, kv_lora_rank + qk_rope_head_dim values (576 for V2/V3), not expanded keys and values.
    The multi-token-prediction layers (V3's num_nextn_predict_layers) are not counted: the
    runtime does not load them."""
    h, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    vocab = config["vocab_size"]
    q_lora, kv_lora = config.get("q_lora_rank"), config["kv_lora_rank"]
    nope, rope, v = config.get("qk_nope_head_dim", 128), config.get("qk_rope_head_dim", 64), config.get("v_head_dim", 128)
    q = h * heads * (nope + rope) if not q_lora else h * q_lora + q_lora + q_lora * heads * (nope + rope)
    attn = q + h * (kv_lora + rope) + kv_lora + kv_lora * heads * (nope + v) + heads * v * h
    experts, k = config.get("n_routed_experts") or 0, config.get("num_experts_per_tok") or 0
    expert = 3 * h * config.get("moe_intermediate_size", 0)
    router = experts * h + (experts if config.get("topk_method") == "noaux_tc" else 0)
    shared = (config.get("n_shared_experts") or 0) * expert
    dense_mlp = 3 * h * config["intermediate_size"]
    freq, first_dense = config.get("moe_layer_freq") or 1, config.get("first_k_dense_replace") or 0
    moe_layers = sum(1 for i in range(layers) if experts and i >= first_dense and i % freq == 0)
    dense_layers = layers - moe_layers
    embed = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    base = layers * (attn + 2 * h) + dense_layers * dense_mlp + h
    params = base + moe_layers * (router + shared + experts * expert) + embed
    active = base + moe_layers * (router + shared + k * expert) + embed - (0 if config.get("tie_word_embeddings") else vocab * h)
    return {"params": params, "active_params": active, "kv_bytes_per_token": layers * (kv_lora + rope) * 2}


def need(params: float, kv_bytes_per_token: int, dtype: str, context: int, concurrency: int, overhead_gib: float) -> dict:
    weights = params * BYTES_PER_PARAM[dtype]
    kv = kv_bytes_per_token * context * concurrency
    total = weights + kv + overhead_gib * GIB
    return {"weights": weights / GIB, "kv_cache": kv / GIB, "overhead": overhead_gib, "total": total / GIB}


def assess(
    gpus: list,
    params: float,
    kv_bytes_per_token: int,
    dtype: str,
    context: int,
    concurrency: int,
    utilization: float,
    overhead_gib: float,
) -> dict:
    if not gpus:
        return {
            "fits": False,
            "recommended_quantization": None,
            "msg": "no NVIDIA GPU found on this host (no NVML device and no working nvidia-smi)",
        }
    usable = min(g["memory_total_mib"] for g in gpus) / 1024 * utilization
    fp8 = fp8_supported(gpus)
    caps = ", ".join(sorted({str(g.get("compute_capability") or "unknown") for g in gpus}))
    no_fp8 = f"{gpus[0]['name']} (compute capability {caps}) has no fp8 (it needs 8.9 or newer)"
    if fp8 is None:
        no_fp8 = f"the compute capability of {gpus[0]['name']} is unknown, so fp8 is not assumed"

    def fits_at(q: str) -> bool:
        in_memory = need(params, kv_bytes_per_token, q, context, concurrency, overhead_gib)["total"] <= usable
        return in_memory and (q != "fp8" or fp8 is True)

    want = need(params, kv_bytes_per_token, dtype, context, concurrency, overhead_gib)
    start = RECOMMEND_ORDER.index("bf16" if dtype == "fp16" else dtype)
    recommended = next((q for q in RECOMMEND_ORDER[start:] if fits_at(q)), None)
    fits = fits_at(dtype)
    headroom = usable - want["total"]
    if recommended:
        verdict = f"; lowest-loss quantization that fits: {recommended}"
    else:
        verdict = "; no quantization fits one GPU"
        fp8_would_fit = need(params, kv_bytes_per_token, "fp8", context, concurrency, overhead_gib)["total"] <= usable
        if fp8 is not True and fp8_would_fit:
            verdict += f" (fp8 would fit in memory, but {no_fp8})"
    msg = (
        f"{params / 1e9:.1f}B parameters at {dtype}: need {want['total']:.1f} GiB "
        f"(weights {want['weights']:.1f}, KV {want['kv_cache']:.1f} for {concurrency} x {context} tokens, "
        f"overhead {overhead_gib:.1f}) of {usable:.1f} GiB usable on {gpus[0]['name']}: "
        + ("fits" if fits else ("does NOT fit" if dtype != "fp8" or fp8 is True else f"does NOT fit: {no_fp8}"))
        + verdict
    )
    return {
        "fits": fits,
        "headroom_gib": round(headroom, 2),
        "need_gib": {k: round(v, 2) for k, v in want.items()},
        "usable_gib": round(usable, 2),
        "fp8_supported": fp8,
        "recommended_quantization": recommended,
        "msg": msg,
    }


def recommend_tensor_parallel(gpus: list, need_gib: dict, usable_gib: float, heads: tuple = ()) -> int | None:
    """Weights and KV cache split evenly over the ranks (by heads); the overhead is per GPU."""
    for tp in (1, 2, 4, 8):
        if tp > len(gpus) or any(h % tp for h in heads):
            continue
        if (need_gib["weights"] + need_gib["kv_cache"]) / tp + need_gib["overhead"] <= usable_gib:
            return tp
    return None


def _heads(path: str) -> tuple:
    """The attention and KV heads a tensor-parallel size must divide."""
    with open(path) as f:
        config = json.load(f)
    heads = config.get("num_attention_heads")
    return tuple(h for h in (heads, config.get("num_key_value_heads") or heads) if h)


# ---- GPU facts -----------------------------------------------------------------------------
def _int(text):
    try:
        return int(str(text).split()[0])
    except (ValueError, IndexError):
        return None


def _numa(bus_id: str) -> tuple:
    """NUMA node and local CPUs of a PCI device, from sysfs."""
    bus = bus_id.lower()
    if bus.count(":") == 2 and len(bus.split(":")[0]) == 8:
        bus = bus[4:]  # nvidia-smi's 8-digit domain -> sysfs's 4-digit one
    base = f"/sys/bus/pci/devices/{bus}"
    try:
        with open(base + "/numa_node") as f:
            node = int(f.read().strip())
        with open(base + "/local_cpulist") as f:
            cpus = f.read().strip()
        return (None if node < 0 else node), cpus
    except OSError:
        return None, None


def parse_nvidia_smi_xml(text: str) -> list:
    root = ET.fromstring(text)
    driver = root.findtext("driver_version")
    cuda = root.findtext("cuda_version")
    out = []
    for i, gpu in enumerate(root.findall("gpu")):
        bus = gpu.get("id", "")
        node, cpus = _numa(bus)
        out.append(
            {
                "index": i,
                "name": gpu.findtext("product_name"),
                "uuid": gpu.findtext("uuid"),
                "pci_bus_id": bus,
                "memory_total_mib": _int(gpu.findtext("fb_memory_usage/total")),
                "compute_capability": None,
                "driver_version": driver,
                "cuda_version": cuda,
                "ecc_mode": gpu.findtext("ecc_mode/current_ecc"),
                "ecc_errors_uncorrected": _int(
                    gpu.findtext("ecc_errors/volatile/dram_uncorrectable")
                    or gpu.findtext("ecc_errors/volatile/sram_uncorrectable")
                    or 0
                ),
                "persistence_mode": gpu.findtext("persistence_mode"),
                "pcie_generation": _int(gpu.findtext("pci/pci_gpu_link_info/pcie_gen/current_link_gen")),
                "pcie_width": _int((gpu.findtext("pci/pci_gpu_link_info/link_widths/current_link_width") or "").rstrip("x")),
                "mig_mode": gpu.findtext("mig_mode/current_mig"),
                "numa_node": node,
                "local_cpus": cpus,
            }
        )
    return out


def query_nvml() -> list | None:
    try:
        import pynvml as nv
    except ImportError:
        return None
    try:
        nv.nvmlInit()
    except Exception:
        return []
    out = []
    driver = nv.nvmlSystemGetDriverVersion()
    cuda = nv.nvmlSystemGetCudaDriverVersion_v2()
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        bus = nv.nvmlDeviceGetPciInfo(h).busId
        bus = bus.decode() if isinstance(bus, bytes) else bus
        node, cpus = _numa(bus)

        def safe(fn, *a):
            try:
                return fn(*a)
            except Exception:
                return None

        ecc = safe(nv.nvmlDeviceGetEccMode, h)
        mig = safe(nv.nvmlDeviceGetMigMode, h)
        cc = safe(nv.nvmlDeviceGetCudaComputeCapability, h)
        out.append(
            {
                "index": i,
                "name": nv.nvmlDeviceGetName(h),
                "uuid": nv.nvmlDeviceGetUUID(h),
                "pci_bus_id": bus,
                "memory_total_mib": nv.nvmlDeviceGetMemoryInfo(h).total // (1 << 20),
                "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
                "driver_version": driver,
                "cuda_version": f"{cuda // 1000}.{cuda % 1000 // 10}",
                "ecc_mode": None if ecc is None else ("Enabled" if ecc[0] else "Disabled"),
                "ecc_errors_uncorrected": safe(
                    nv.nvmlDeviceGetTotalEccErrors, h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC
                ),
                "persistence_mode": "Enabled" if safe(nv.nvmlDeviceGetPersistenceMode, h) else "Disabled",
                "pcie_generation": safe(nv.nvmlDeviceGetCurrPcieLinkGeneration, h),
                "pcie_width": safe(nv.nvmlDeviceGetCurrPcieLinkWidth, h),
                "mig_mode": None if mig is None else ("Enabled" if mig[0] else "Disabled"),
                "numa_node": node,
                "local_cpus": cpus,
            }
        )
    return out


def parse_compute_caps(text: str) -> dict:
    """`nvidia-smi --query-gpu=pci.bus_id,compute_cap --format=csv,noheader`: bus id -> "9.0"."""
    caps = {}
    for line in text.splitlines():
        bus, _, cap = (part.strip() for part in line.partition(","))
        if _capability(cap):
            caps[bus.lower()] = cap
    return caps


def discover() -> tuple:
    gpus = query_nvml()
    if gpus:
        return gpus, "nvml"
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "-q", "-x"], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            gpus = parse_nvidia_smi_xml(r.stdout)
            # The XML has no compute capability; the query form has it since driver 510.
            q = subprocess.run(
                [smi, "--query-gpu=pci.bus_id,compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=60
            )
            caps = parse_compute_caps(q.stdout) if q.returncode == 0 else {}
            for gpu in gpus:
                gpu["compute_capability"] = caps.get(gpu["pci_bus_id"].lower())
            return gpus, "nvidia-smi"
    return [], "none"


def main():
    module = AnsibleModule(
        argument_spec=dict(
            model_config=dict(type="path"),
            params_billion=dict(type="float"),
            kv_bytes_per_token=dict(type="int"),
            dtype=dict(type="str", default="bf16", choices=LADDER),
            context_length=dict(type="int", default=4096),
            concurrency=dict(type="int", default=1),
            gpu_memory_utilization=dict(type="float", default=0.95),
            overhead_gib=dict(type="float", default=2.0),
        ),
        required_one_of=[("model_config", "params_billion")],
        mutually_exclusive=[("model_config", "params_billion")],
        required_together=[("params_billion", "kv_bytes_per_token")],
        supports_check_mode=True,
    )
    p = module.params
    if p["model_config"]:
        if not os.path.exists(p["model_config"]):
            module.fail_json(msg=f"model_config {p['model_config']} does not exist on the host")
        with open(p["model_config"]) as f:
            shape = model_shape(json.load(f))
    else:
        shape = {"params": p["params_billion"] * 1e9, "active_params": None, "kv_bytes_per_token": p["kv_bytes_per_token"]}
    gpus, source = discover()
    result = assess(
        gpus,
        shape["params"],
        shape["kv_bytes_per_token"],
        p["dtype"],
        p["context_length"],
        p["concurrency"],
        p["gpu_memory_utilization"],
        p["overhead_gib"],
    )
    if gpus:
        heads = _heads(p["model_config"]) if p["model_config"] else ()
        result["recommended_tensor_parallel_size"] = recommend_tensor_parallel(
            gpus, result["need_gib"], result["usable_gib"], heads
        )
    module.exit_json(changed=False, gpus=gpus, source=source, model=shape, **result)


if __name__ == "__main__":
    main()
