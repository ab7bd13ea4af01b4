"""Server settings: a YAML file, overridden by command-line flags. Every key is documented in
runtime/README.md ("Server configuration reference")."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from inferd.config import KVCacheDType, Quantization


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_concurrent_per_key: int = Field(16, ge=1)
    requests_per_minute_per_key: int = Field(600, ge=1)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = ""
    model_key_file: str | None = None  # packed, encrypted models: else $INFERD_MODEL_KEY_FILE or the credential
    served_model_name: str | None = None
    model_version: str | None = None  # reported by /health; default: the packed model's manifest digest
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    device: str = "cpu"
    dtype: str | None = None
    quantization: Quantization | None = None
    kv_cache_dtype: KVCacheDType = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = Field(64, ge=1)
    kv_cache_fraction: float = Field(0.9, gt=0, le=1)
    data_dir: str = "/var/lib/inferd"
    keys_file: str | None = None  # default: <data_dir>/keys.json
    audit_file: str | None = None  # default: <data_dir>/audit/audit.log
    audit_ring_size: int = Field(4096, ge=1)
    audit_full_timeout_s: float = Field(0.5, gt=0)
    audit_log_prompts: bool = False
    results_dir: str | None = None  # default: <data_dir>/results
    results_retention_hours: float = Field(24.0, gt=0)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_tokens_limit: int = Field(4096, ge=1)
    max_n: int = Field(8, ge=1)
    metrics_bearer_token_sha256: str | None = None
    shutdown_timeout_s: float = Field(30.0, gt=0)
    limits: LimitsConfig = LimitsConfig()

    def path(self, value: str | None, default: str) -> Path:
        return Path(value) if value else Path(self.data_dir) / default

    @property
    def keys_path(self) -> Path:
        return self.path(self.keys_file, "keys.json")

    @property
    def audit_path(self) -> Path:
        return self.path(self.audit_file, "audit/audit.log")

    @property
    def results_path(self) -> Path:
        return self.path(self.results_dir, "results")

    @property
    def model_id(self) -> str:
        return self.served_model_name or Path(self.model).name


def load_config(path: str | None, **overrides) -> ServerConfig:
    raw = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file {p} not found")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: the config must be a YAML mapping of settings")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return ServerConfig(**raw)
