#!/usr/bin/env bash
# Runs on the lent GPU machine (Ubuntu 24.04, root, no systemd binary) through the device tool:
# boots Debian's systemd as PID 1 in its own PID, mount and cgroup namespaces over the machine's
# own root (as systemd-nspawn does, without a second root filesystem), installs the runtime the way
# the inference_runtime role does, starts the role's rendered inferd.service verbatim, and checks
# that it serves a CUDA-graph decode and GPU metrics with its sandbox in force.
# Inputs: .cache/device-systemd from scripts/device-systemd-prepare.sh. Results: $OUT/systemd-check/.
# The machine's own configuration is left alone: systemd's files, /etc/systemd, the library cache
# and /run are bind mounts inside the private mount namespace, and every unit that would change the
# host (sysctl, tmpfiles, remount, sysusers, modules, ldconfig, swap) is masked there.
set -uo pipefail
src=$PWD/.cache/device-systemd
out=${OUT:-/tmp/device-out}/systemd-check
work=/opt/inferd-device-check
mkdir -p "$out" "$work"
exec > >(tee "$out/log.txt") 2>&1
[ -d "$src/rendered" ] || { echo "error: $src missing: run scripts/device-systemd-prepare.sh and carry .cache/device-systemd"; exit 1; }
for cmd in curl unshare nsenter pgrep dpkg ldconfig; do command -v $cmd >/dev/null || { echo "error: $cmd missing"; exit 1; }; done
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*"; echo "FAIL: $*" >>"$out/summary.txt"; }
pass() { echo "ok: $*"; echo "ok: $*" >>"$out/summary.txt"; }
: >"$out/summary.txt"

step "systemd from Debian's packages, unpacked (not installed)"
sys=$work/sysroot
rm -rf "$sys" && mkdir -p "$sys"
for deb in "$src"/debs/*.deb; do dpkg -x "$deb" "$sys"; done
LD_LIBRARY_PATH="$sys/usr/lib/x86_64-linux-gnu/systemd:$sys/usr/lib/x86_64-linux-gnu" "$sys/lib/systemd/systemd" --version | head -1
# A library cache that also finds libkmod/libip4tc from the packages; bound over /etc/ld.so.cache
# inside the namespace only.
printf 'include /etc/ld.so.conf.d/*.conf\n%s\n' "$sys/usr/lib/x86_64-linux-gnu" >"$work/ld.so.conf"
ldconfig -f "$work/ld.so.conf" -C "$work/ld.so.cache"

step "the runtime, installed as the role installs it"
id inferd >/dev/null 2>&1 || useradd --system --shell /usr/sbin/nologin --home-dir /var/lib/inferd --no-create-home inferd
install -d -o root -g root -m 0755 /opt/inferd
install -d -o root -g inferd -m 0750 /etc/inferd
install -d -o inferd -g inferd -m 0751 /var/lib/inferd
install -d -o inferd -g inferd -m 0750 /var/lib/inferd/models
# The machine's CUDA build of torch stands for the wheelhouse's (too large to carry).
[ -x /opt/inferd/venv/bin/python ] || python3 -m venv /opt/inferd/venv
machine_site=$(env -u PYTHONPATH python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))" 2>/dev/null ||
  python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
echo "the machine's torch lies in $machine_site (PYTHONPATH='${PYTHONPATH:-}')"
echo "$machine_site" >/opt/inferd/venv/lib/python3.12/site-packages/machine-torch.pth
/opt/inferd/venv/bin/pip install -q --no-index --find-links "$src/wheels" --no-deps inferd &&
  /opt/inferd/venv/bin/pip install -q --no-index --find-links "$src/wheels" fastapi uvicorn rocksdict zstandard \
    cryptography || { fail "pip install from the carried wheels"; exit 1; }
/opt/inferd/venv/bin/python -c "import torch, inferd; print('torch', torch.__version__, torch.__file__)"
inferd=/opt/inferd/venv/bin/inferd

step "a tiny model, packed encrypted and signed as a bank receives one"
rm -rf "$work/model" "$work/keys" "$work/packed"
PYTHONPATH= /opt/inferd/venv/bin/python -c "import sys; from inferd.testing import make_model; make_model(sys.argv[1], arch='llama', heads=4, kv_heads=2)" "$work/model" >/dev/null
"$inferd" keygen --out "$work/keys" >/dev/null
"$inferd" pack "$work/model" "$work/packed" --encrypt --key-file "$work/keys/model.key" \
  --sign-key "$work/keys/signing.pem" --model-id deepseek-device >/dev/null
"$inferd" verify "$work/packed" --public-key "$work/keys/signing.pub" --key-file "$work/keys/model.key" >/dev/null &&
  pass "packed model verifies" || fail "packed model verify"
rm -rf /var/lib/inferd/models/v1 && cp -r "$work/packed" /var/lib/inferd/models/v1
ln -sfn v1 /var/lib/inferd/models/current
chown -R inferd:inferd /var/lib/inferd/models
install -o root -g root -m 0600 "$work/keys/model.key" /etc/inferd/model.key
install -o root -g inferd -m 0640 "$work/keys/signing.pub" /etc/inferd/model-signing.pub
install -o root -g inferd -m 0640 "$src/rendered/config.yaml" /etc/inferd/config.yaml
install -o inferd -g inferd -m 0600 "$src/rendered/keys.json" /var/lib/inferd/keys.json

step "systemd's configuration for the namespace (bound over /etc/systemd inside it)"
etc=$work/etc-systemd
rm -rf "$etc" && mkdir -p "$etc/system"
cp -r "$sys/etc/systemd/." "$etc/"
install -m 0644 "$src/rendered/inferd.service" "$etc/system/inferd.service"
cat >"$etc/system/inferd-check.target" <<'UNIT'
[Unit]
Description=Boot target of the GPU machine's systemd check
Requires=sysinit.target
After=sysinit.target
UNIT
for unit in systemd-sysctl.service systemd-modules-load.service systemd-remount-fs.service \
  systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service systemd-tmpfiles-clean.timer \
  systemd-sysusers.service systemd-random-seed.service systemd-machine-id-commit.service \
  systemd-binfmt.service systemd-firstboot.service systemd-hwdb-update.service ldconfig.service \
  systemd-update-utmp.service systemd-pstore.service systemd-repart.service kmod-static-nodes.service \
  systemd-journal-catalog-update.service systemd-update-done.service swap.target \
  systemd-boot-update.service proc-sys-fs-binfmt_misc.automount sys-kernel-config.mount \
  sys-kernel-debug.mount sys-kernel-tracing.mount sys-fs-fuse-connections.mount dev-hugepages.mount \
  dev-mqueue.mount tmp.mount systemd-fsck-root.service systemd-networkd.service systemd-resolved.service; do
  ln -sf /dev/null "$etc/system/$unit"
done
: >"$work/fstab"

step "boot systemd as PID 1 (PID + mount + cgroup namespaces over the machine's root)"
mkdir -p /usr/lib/x86_64-linux-gnu/systemd /etc/systemd  # mount points (empty on this machine)
cg=/sys/fs/cgroup/inferd-device-check-$$  # a new one each run: systemd leaves the last one non-leaf
[ -d "$cg" ] || mkdir "$cg"
cat >"$work/boot.sh" <<BOOT
#!/bin/bash
set -e
# Wait until the unshare parent (outside this PID namespace, shown as pid 0) has left the cgroup:
# cgroup v2 lets only leaf cgroups hold processes once systemd enables controllers below.
for _ in \$(seq 100); do [ "\$(grep -c . $cg/cgroup.procs)" -le 1 ] && break; sleep 0.1; done
# systemd leaves mount propagation to its container manager: shared, as systemd-nspawn sets it, so
# that mounts made in a service's namespace setup (the credentials) reach the service.
mount --make-rshared /
mount -t proc proc /proc
umount -l /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup  # this namespace's own view
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount --bind $sys/lib/systemd /usr/lib/systemd
mount --bind $sys/usr/lib/x86_64-linux-gnu/systemd /usr/lib/x86_64-linux-gnu/systemd
mount --bind $etc /etc/systemd
mount --bind $work/ld.so.cache /etc/ld.so.cache
mount --bind $work/fstab /etc/fstab
exec env -i container=inferd-device-check PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  /usr/lib/systemd/systemd --unit=inferd-check.target --log-target=console --show-status=no
BOOT
chmod +x "$work/boot.sh"
(echo $BASHPID >"$cg/cgroup.procs" && exec unshare --pid --mount --cgroup --fork --propagation private "$work/boot.sh") \
  >"$out/pid1-console.txt" 2>&1 &
boot=$!
pid1=""
for _ in $(seq 50); do pid1=$(pgrep -P "$boot" | head -1); [ -n "$pid1" ] && break; sleep 0.1; done
[ -n "$pid1" ] || { fail "no PID 1 started"; cat "$out/pid1-console.txt"; exit 1; }
echo "$boot" >/sys/fs/cgroup/cgroup.procs  # the unshare parent leaves the namespace's root cgroup
in_ns() { nsenter --target "$pid1" --mount --pid --cgroup -- "$@"; }
systemctl() { in_ns "$sys/bin/systemctl" "$@"; }
journalctl() { in_ns "$sys/bin/journalctl" "$@"; }
for _ in $(seq 60); do
  state=$(systemctl is-system-running 2>/dev/null || true)
  case "$state" in running | degraded) break ;; esac
  sleep 1
done
echo "system state: $state (pid 1 is $(in_ns ps -p 1 -o comm=))"
[ "$state" = running ] || [ "$state" = degraded ] && pass "systemd booted as PID 1 ($state)" || fail "systemd did not boot ($state)"
systemctl --failed --no-legend >"$out/failed-units.txt" 2>&1
if [ "$state" != running ] && [ "$state" != degraded ]; then
  cat "$out/pid1-console.txt"; kill -9 "$boot" "$pid1" 2>/dev/null; exit 1
fi

step "start the role's inferd.service verbatim"
systemctl daemon-reload
systemctl start inferd.service
wait_ready() {
  for _ in $(seq 150); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/ready)" = 200 ] && return 0
    [ "$(systemctl is-active inferd.service)" = failed ] && return 1
    [ "$(systemctl show -p NRestarts --value inferd.service)" -gt 0 ] && return 1  # it died once: see the journal
    journalctl --no-pager _SYSTEMD_INVOCATION_ID="$(systemctl show -p InvocationID --value inferd.service)" 2>/dev/null |
      grep -q "model load failed" && return 1
    sleep 2
  done
  return 1
}
ready=""
wait_ready && ready=1
in_ns sh -c 'ls -la /run/credentials /run/credentials/inferd.service; findmnt -R /run/credentials' \
  >"$out/credentials.txt" 2>&1
journalctl -u inferd.service --no-pager -o short-monotonic | grep -v 'GET /ready' >"$out/inferd-journal.txt" 2>&1
if [ -n "$ready" ]; then pass "inferd.service ready, model decrypted in memory with the credential model-key"
else
  fail "inferd.service not ready with the encrypted model (credential: $(grep -o 'model load failed.*' "$out/inferd-journal.txt" | head -1 | cut -c1-200))"
  step "again with the model decrypted on disk (the demo's setting), to check CUDA under the same sandbox"
  rm -rf /var/lib/inferd/models/v1-plain && "$inferd" unpack "$work/packed" /var/lib/inferd/models/v1-plain --key-file "$work/keys/model.key" --public-key "$work/keys/signing.pub" >/dev/null
  chown -R inferd:inferd /var/lib/inferd/models/v1-plain && ln -sfn v1-plain /var/lib/inferd/models/current
  systemctl restart inferd.service
  wait_ready && ready=1
  journalctl -u inferd.service --no-pager -o short-monotonic | grep -v 'GET /ready' >"$out/inferd-journal.txt" 2>&1
  [ -n "$ready" ] && pass "inferd.service ready (plaintext model)" || { fail "inferd.service not ready (plaintext model)"; tail -n 40 "$out/inferd-journal.txt"; }
fi
systemctl status inferd.service --no-pager >"$out/inferd-status.txt" 2>&1

if [ -n "$ready" ]; then
  step "one chat completion through the sandboxed service"
  key=$(cat "$src/api-key")
  curl -sS http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d '{"model": "deepseek-device", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32, "temperature": 0}' \
    >"$out/completion.json"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['usage']['completion_tokens'] > 0, r; print(r['choices'][0])" \
    "$out/completion.json" && pass "chat completion answered" || fail "chat completion: $(head -c 400 "$out/completion.json")"
  grep -q "CUDA graph" "$out/inferd-journal.txt" && pass "CUDA graphs captured ($(grep -o 'captured.*' "$out/inferd-journal.txt" | head -1))" ||
    { journalctl -u inferd.service --no-pager >"$out/inferd-journal.txt" 2>&1; grep -q "CUDA graph" "$out/inferd-journal.txt" && pass "CUDA graphs captured" || fail "no CUDA graph capture in the journal"; }
  curl -sS -H "Authorization: Bearer $(cat "$src/metrics-token")" http://127.0.0.1:8000/metrics >"$out/metrics.txt" 2>&1
  grep -E '^inferd_gpu_(memory_used_bytes|utilization_ratio|temperature_celsius)' "$out/metrics.txt" | head -5
  grep -qE '^inferd_gpu_memory_used_bytes\{' "$out/metrics.txt" && pass "GPU metrics (NVML) served" || fail "no GPU metrics in /metrics"

  step "the sandbox as the kernel sees it"
  main=$(systemctl show -p MainPID --value inferd.service)
  in_ns grep -E '^(Uid|NoNewPrivs|Seccomp|CapEff|CapBnd|Cpus_allowed_list)' /proc/"$main"/status | tee "$out/sandbox-status.txt"
  grep -q '^NoNewPrivs:\s*1' "$out/sandbox-status.txt" && pass "NoNewPrivileges in force" || fail "NoNewPrivs not set"
  grep -q '^Seccomp:\s*2' "$out/sandbox-status.txt" && pass "seccomp filter in force" || fail "no seccomp filter"
  grep -q '^CapEff:\s*0000000000000000' "$out/sandbox-status.txt" && pass "no capabilities" || fail "capabilities left"
  systemctl show inferd.service -p DevicePolicy -p DeviceAllow -p ProtectSystem -p ProtectProc -p SystemCallFilter \
    -p User >"$out/sandbox-show.txt"
  in_ns nsenter --target "$main" --mount -- sh -c 'touch /usr/inferd-probe 2>&1; ls /proc | grep -c "^[0-9]"' \
    >"$out/sandbox-probe.txt" 2>&1
  grep -q "Read-only file system" "$out/sandbox-probe.txt" && pass "system read-only for the service" || fail "system writable: $(cat "$out/sandbox-probe.txt")"
fi

step "stop"
systemctl stop inferd.service
kill -s SIGRTMIN+3 "$pid1" 2>/dev/null
for _ in $(seq 30); do kill -0 "$boot" 2>/dev/null || break; sleep 1; done
kill -9 "$boot" "$pid1" 2>/dev/null
echo
cat "$out/summary.txt"
! grep -q '^FAIL' "$out/summary.txt"
