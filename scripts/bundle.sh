#!/usr/bin/env bash
# Build the offline bundle: everything a GPU host needs, in one directory, on a machine with
# network access (PyPI and a Debian mirror). The air-gapped deployment reads nothing else.
#
#   bundle.sh [options] OUT_DIR
#     --torch cpu|cuda    torch build in the wheelhouse. cpu (default): 237 MB in all. cuda: PyPI's
#                         torch 2.13.0 for CUDA 13 (its wheel alone 527 MB) with the cuda-toolkit,
#                         cuDNN, cuSPARSELt, NCCL, NVSHMEM and triton wheels it requires: several GB
#                         (bundle.json records wheelhouse_bytes); also adds the compilers Triton needs
#                         to the .debs. BUNDLE_PIP_INDEX names another index (a bank's mirror).
#     --model DIR         a packed model (`inferd pack --encrypt --sign-key`); default: the demo's
#     --deb FILE          a vendor .deb to serve from the bundle's repository with its Debian
#                         dependencies (Grafana, NVIDIA driver, container toolkit); repeatable
#     --keyring FILE      a vendor keyring to carry in keyrings/ (repeatable)
#     --base-status FILE  /var/lib/dpkg/status of the target's minimal OS: what the .debs need not
#                         carry (default: the test-host image's, a Debian bookworm minbase)
#     --release NAME      Debian release of the target (default bookworm)
#
# Layout: wheelhouse/, debs/ (a flat apt repository signed by a key made for this bundle, whose
# private half is thrown away), keyrings/inferd-bundle.gpg, model/<id>.packed/, dashboards/,
# bundle.json, and MANIFEST.sha256 over every other file. The last line printed is the manifest's
# own sha256: record it with the change and pin it as offline_bundle_manifest_sha256.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

torch=cpu model="" base_status="" release=bookworm
debs_extra=() keyrings=()
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) torch="${2:?--torch needs cpu or cuda}"; shift 2 ;;
    --model) model="${2:?--model needs a directory}"; shift 2 ;;
    --deb) debs_extra+=("$(realpath "${2:?--deb needs a file}")"); shift 2 ;;
    --keyring) keyrings+=("${2:?--keyring needs a file}"); shift 2 ;;
    --base-status) base_status="${2:?--base-status needs a file}"; shift 2 ;;
    --release) release="${2:?--release needs a name}"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1." "run $0 --help." ;;
    *) break ;;
  esac
done
out="${1:?usage: $0 [options] OUT_DIR (see --help)}"
[ "$torch" = cpu ] || [ "$torch" = cuda ] || die "--torch must be cpu or cuda (got '$torch')." "pick one."
py="${VENV:-$PROJECT_ROOT/.venv}/bin/python"
[ -x "$py" ] || die "no virtualenv at ${py%/bin/python}." "run 'make setup' first."
need_cmd dpkg-scanpackages dpkg-dev
need_cmd gpg gnupg
need_cmd apt-get apt
for f in "${debs_extra[@]}" "${keyrings[@]}" ${base_status:+"$base_status"}; do
  [ -f "$f" ] || die "$f does not exist." "give the path of an existing file."
done

# The packages the roles install beyond a minimal OS (inference_runtime, gateway, monitoring,
# model_storage); tests/test_bundle.py checks this list against the roles' apt tasks.
BUNDLE_PACKAGES=(python3-venv python3-packaging nginx-light python3-cryptography
  prometheus prometheus-node-exporter prometheus-alertmanager e2fsprogs nvme-cli xfsprogs chrony)
# inference_runtime on a CUDA host: Triton compiles its launcher with these.
[ "$torch" = cuda ] && BUNDLE_PACKAGES+=(gcc libc6-dev python3-dev)

if [ -z "$model" ] || [ "$torch" = cpu ]; then
  "$PROJECT_ROOT/scripts/demo-assets.sh" "$PROJECT_ROOT/.cache/demo"
fi
model="${model:-$PROJECT_ROOT/.cache/demo/demo-model.packed}"
[ -f "$model/manifest.json" ] ||
  die "$model is not a packed model (no manifest.json)." "pack it: inferd pack MODEL_DIR OUT --encrypt --key-file KEY --sign-key SIGNING.pem --model-id ID"
model_id=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_id"])' "$model/manifest.json")

# Unchanged inputs: keep the bundle (and its pinned digest). The .debs are re-resolved on any change.
[ -n "$base_status" ] && base_key=$(sha256sum <"$base_status") || base_key="$(testhost_image 2>/dev/null || true)"
key=$(cat "$0" "$model/manifest.json" "${debs_extra[@]}" "${keyrings[@]}" "$PROJECT_ROOT/.cache/demo/wheelhouse/.stamp" 2>/dev/null |
  { cat; printf '%s ' "$torch" "$release" "$base_key" "${BUNDLE_PIP_INDEX:-}"; } | sha256sum | cut -c1-16)
if [ -f "$out/MANIFEST.sha256" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$key" ]; then
  log "bundle in $out is up to date; its manifest's sha256 (offline_bundle_manifest_sha256):"
  sha256sum <"$out/MANIFEST.sha256" | cut -d' ' -f1
  exit 0
fi

mkdir -p "$(dirname "$out")"
work="$out.partial"
rm -rf "$work"
tmp=$(mktemp -d)
trap 'rm -rf "$work" "$tmp"' EXIT
mkdir -p "$work"/{wheelhouse,debs,keyrings,model,dashboards}

# 1. The wheelhouse, for the host's Python (bookworm: CPython 3.11, x86_64).
if [ "$torch" = cpu ]; then
  log "wheelhouse: the runtime with CPU torch (the demo's, hard-linked)"
  cp -al "$PROJECT_ROOT/.cache/demo/wheelhouse/." "$work/wheelhouse/"
  rm -f "$work/wheelhouse/.stamp"
else
  log "wheelhouse: the runtime with PyPI's CUDA torch (several GB)"
  # PyPI's Linux torch wheel is the CUDA build; pip's configured extra indexes and find-links may
  # hold the +cpu one, so this build reads no pip configuration (PIP_CONFIG_FILE=/dev/null).
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null "$py" -m pip wheel -q -w "$work/wheelhouse" \
    --index-url "${BUNDLE_PIP_INDEX:-https://pypi.org/simple}" "$PROJECT_ROOT/runtime" torch==2.13.0 ||
    die "building the CUDA wheelhouse failed (see pip's message above)." "check that PyPI is reachable, then run again."
  if compgen -G "$work/wheelhouse/torch-*+cpu-*.whl" >/dev/null; then
    die "pip picked a CPU torch wheel for the CUDA bundle." "point BUNDLE_PIP_INDEX at an index with the CUDA build."
  fi
fi

# 2. The .debs: the dependency closure of BUNDLE_PACKAGES (and any vendor .deb) on top of the
#    target's minimal OS, resolved by apt in a throw-away root for the target release.
if [ -z "$base_status" ]; then
  need_cmd podman
  base_status="$tmp/status"
  "$PROJECT_ROOT/scripts/testhost-image.sh" >/dev/null
  podman run --rm --network none "$(testhost_image)" cat /var/lib/dpkg/status >"$base_status" ||
    die "could not read the test-host image's package list." "pass --base-status FILE (the target's /var/lib/dpkg/status)."
fi
log "debs: resolving ${BUNDLE_PACKAGES[*]} ${debs_extra[*]} for $release"
root="$tmp/aptroot"
mkdir -p "$root"/etc/apt/{sources.list.d,preferences.d,apt.conf.d,trusted.gpg.d} "$root"/var/lib/apt/lists/partial \
  "$root"/var/cache/apt/archives/partial "$root"/var/lib/dpkg
cp "$base_status" "$root/var/lib/dpkg/status"
mirror=$(debian_mirror)
cat >"$root/etc/apt/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $release main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $release-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/debian}/debian-security $release-security main
EOF
apt_root=(-o "Dir=$root" -o "Dir::State::status=$root/var/lib/dpkg/status" -o APT::Architecture=amd64
  -o APT::Architectures=amd64 -o Debug::NoLocking=1 -o APT::Sandbox::User=root -o Acquire::Languages=none)
apt-get "${apt_root[@]}" update -qq ||
  die "apt could not read $mirror for $release." "check that the mirror is reachable, then run again."
apt-get "${apt_root[@]}" install -qq -y --download-only --no-install-recommends \
  -o "Dir::Cache::archives=$root/var/cache/apt/archives" "${BUNDLE_PACKAGES[@]}" "${debs_extra[@]}" >/dev/null ||
  die "apt could not resolve the packages for $release (see its message above)." \
    "check the --deb files are for $release/amd64 and that --base-status is the target's."
mv "$root"/var/cache/apt/archives/*.deb "$work/debs/"
for f in "${debs_extra[@]}"; do cp "$f" "$work/debs/"; done

# A flat repository, signed by a key made for this bundle. apt checks that signature on every
# read of the host's copy; the private half exists only while this script runs.
export GNUPGHOME="$tmp/gnupg"
mkdir -m 700 "$GNUPGHOME"
gpg --batch -q --passphrase '' --quick-gen-key "inferd offline bundle $(date -u +%Y%m%dT%H%M%SZ)" ed25519 sign 1y
gpg --batch -q --export >"$work/keyrings/inferd-bundle.gpg"
(
  cd "$work/debs"
  dpkg-scanpackages --multiversion . /dev/null 2>/dev/null >Packages
  gzip -9kn Packages
  {
    printf 'Origin: inferd-bundle\nLabel: inferd-bundle\nArchitectures: amd64 all\nDate: %s\nSHA256:\n' \
      "$(date -u -R)"
    for f in Packages Packages.gz; do printf ' %s %s %s\n' "$(sha256sum <"$f" | cut -d' ' -f1)" "$(stat -c %s "$f")" "$f"; done
  } >Release
  gpg --batch -q --clearsign -o InRelease Release
)
rm -rf "$GNUPGHOME"
unset GNUPGHOME

# 3. The packed model, the dashboards, vendor keyrings.
log "model: $model_id from $model"
cp -r "$model" "$work/model/$model_id.packed"
cp "$PROJECT_ROOT"/roles/grafana/files/dashboards/*.json "$work/dashboards/"
for k in "${keyrings[@]}"; do cp "$k" "$work/keyrings/"; done

# 4. What is in it, then the manifest over every file.
torch_whl=$(cd "$work/wheelhouse" && ls torch-*.whl)
"$py" - "$work/bundle.json" "$release" "$torch" "$torch_whl" "$model_id" "$(du -sb "$work/wheelhouse" | cut -f1)" <<'PY'
import json, sys
path, release, torch, whl, model_id, size = sys.argv[1:]
json.dump({"release": release, "architecture": "amd64", "python": "cp311", "torch": torch, "torch_wheel": whl,
           "wheelhouse_bytes": int(size), "model_id": model_id}, open(path, "w"), indent=2)
PY
(cd "$work" && find . -type f ! -name MANIFEST.sha256 -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum >MANIFEST.sha256)
rm -rf "$out" "$out.stamp"
mv "$work" "$out"
printf '%s' "$key" >"$out.stamp"
trap 'rm -rf "$tmp"' EXIT
log "bundle in $out: $(du -sh "$out" | cut -f1) (wheelhouse $(du -sh "$out/wheelhouse" | cut -f1), torch $torch, $(find "$out/debs" -name '*.deb' | wc -l) .debs)"
log "pin this in the inventory as offline_bundle_manifest_sha256:"
sha256sum <"$out/MANIFEST.sha256" | cut -d' ' -f1
