#!/usr/bin/env bash
# Print what now runs on the demo host, one answer from it, and how to reach it.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
host="${1:-inferd-demo}"
keys="$PROJECT_ROOT/.cache/demo/api-keys.json"
ip=$(podman container inspect -f "{{(index .NetworkSettings.Networks \"$TESTHOST_NETWORK\").IPAddress}}" "$host")
user_key=$(python3 -c "import json,sys; print(next(k['key'] for k in json.load(open(sys.argv[1])) if k['role']=='user'))" "$keys")
state=$(podman exec "$host" systemctl is-active inferd || true)
cat <<MSG

Demo host '$host' is up at $ip (a podman container with systemd as PID 1).
  inferd.service: $state   (podman exec $host systemctl status inferd)
  the server listens on 127.0.0.1:8000 inside the host; the TLS gateway is not built yet.

One chat completion, asked inside the host with the demo user key:
MSG
podman exec "$host" curl -sS http://127.0.0.1:8000/v1/chat/completions \
  -H "Authorization: Bearer $user_key" -H 'Content-Type: application/json' \
  -d '{"model": "deepseek-demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}' | sed 's/^/  /'
cat <<MSG


Try it yourself (the demo keys are in .cache/demo/api-keys.json):
  podman exec $host curl -s http://127.0.0.1:8000/v1/chat/completions \\
    -H "Authorization: Bearer \$KEY" -H 'Content-Type: application/json' \\
    -d '{"model": "deepseek-demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}'
  re-run:     ansible-playbook site.yml -i inventory/demo      (idempotent: changed=0)
  tear down:  make demo-down
MSG
