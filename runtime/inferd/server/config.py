"""Server settings: a YAML file, overridden by command-line flags. Every key is documented in
runtime/README.md ("Server configuration reference").

The engine's settings are the engine's own `EngineConfig` (one set of defaults and checks),
embedded as `ServerConfig.engine`; users write its keys at the top level of the file beside the
server's, as they always have. A bad value fails `load_config`, before anything starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inferd.config import EngineConfig

# The engine keys a config file may set (the model comes from `model`, for the server too).
ENGINE_KEYS = frozenset(f.name for f in dataclasses.fields(EngineConfig)) - {"model"}


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_concurrent_per_key: int = Field(16, ge=1)
    requests_per_minute_per_key: int = Field(600, ge=1)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = ""
    model_public_key_file: str | None = None  # the package signer's Ed25519 public key: store/trust.py's rule
    model_allow_unsigned: bool = False  # serve unsigned models when no public key is set (never by default)
    served_model_name: str | None = None
    model_store_dir: str | None = None  # where POST /admin/model/swap takes packages from; default: model's parent
    model_version: str | None = None  # reported by /health; default: the packed model's manifest digest
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    engine: EngineConfig  # from the top-level engine keys (ENGINE_KEYS) and `model`
    data_dir: str = "/var/lib/inferd"
    keys_file: str | None = None  # default: <data_dir>/keys.json
    audit_file: str | None = None  # default: <data_dir>/audit/audit.log
    audit_ring_size: int = Field(4096, ge=1)
    audit_full_timeout_s: float = Field(0.5, gt=0)
    audit_log_prompts: bool = False
    audit_key_file: str | None = None  # default: <data_dir>/audit.key (made 0600 on first start)
    audit_anchor_file: str | None = None  # default: <data_dir>/audit.anchor
    audit_segment_bytes: int = Field(64 << 20, ge=4096)
    audit_retention_days: float | None = Field(None, gt=0)  # None: keep every segment
    results_dir: str | None = None  # default: <data_dir>/results
    results_retention_hours: float = Field(24.0, gt=0)
    results_max_mb: float = Field(1024.0, gt=0)  # the oldest results go first beyond it
    results_maintenance_interval_s: float = Field(300.0, gt=0)  # expiry, size cap and compaction
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # Refusals (401/403/404/400) a client without a valid key gets a minute, audited; beyond: 429, not audited.
    anonymous_refusals_per_minute: int = Field(60, ge=1)
    body_timeout_s: float = Field(30.0, gt=0)  # a body not all in within it is a 408
    max_tokens_limit: int = Field(4096, ge=1)
    max_n: int = Field(8, ge=1)
    # How chat answers' R1 thinking is split into reasoning_content (server/reasoning.py): auto
    # when the chat template opens the thinking or the output starts with <think>.
    reasoning_parser: Literal["auto", "deepseek_r1", "none"] = "auto"
    metrics_bearer_token_sha256: str | None = None
    shutdown_timeout_s: float = Field(30.0, gt=0)
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="before")
    @classmethod
    def _gather_engine_keys(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        engine = data.pop("engine", None) or {}
        engine = dataclasses.asdict(engine) if isinstance(engine, EngineConfig) else dict(engine)
        engine.update({k: data.pop(k) for k in ENGINE_KEYS & data.keys()})
        engine["model"] = data.get("model", "")
        data["engine"] = engine
        return data

    def engine_config(self, model: str) -> EngineConfig:
        """The engine's settings for serving `model` (the configured one, or one loaded later)."""
        return dataclasses.replace(self.engine, model=model)

    def path(self, value: str | None, default: str) -> Path:
        return Path(value) if value else Path(self.data_dir) / default

    @property
    def keys_path(self) -> Path:
        return self.path(self.keys_file, "keys.json")

    @property
    def audit_path(self) -> Path:
        return self.path(self.audit_file, "audit/audit.log")

    @property
    def audit_key_path(self) -> Path:
        return self.path(self.audit_key_file, "audit.key")

    @property
    def audit_anchor_path(self) -> Path:
        return self.path(self.audit_anchor_file, "audit.anchor")

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
    try:
        return ServerConfig(**raw)
    except ValidationError as e:
        raise ValueError(f"{path or 'the command line'}: {describe(e)}") from None


def describe(error: ValidationError) -> str:
    """One line per bad setting, named as the user writes it (`dtype`, `limits.max_n`)."""
    lines = []
    for err in error.errors():
        loc = [str(x) for x in err["loc"]]
        if loc[:1] == ["engine"]:
            loc = loc[1:]  # engine keys are written at the top level
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(lines)
