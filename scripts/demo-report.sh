#!/usr/bin/env bash
# Print what now runs on the demo host, one answer through its TLS gateway, and how to reach it.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
host="${1:-inferd-demo}"
demo="$PROJECT_ROOT/.cache/demo"
ip=$(podman container inspect -f "{{(index .NetworkSettings.Networks \"$TESTHOST_NETWORK\").IPAddress}}" "$host")
user_key=$(python3 -c "import json,sys; print(next(k['key'] for k in json.load(open(sys.argv[1])) if k['role']=='user'))" "$demo/api-keys.json")
podman cp "$host:/etc/inferd/pki/ca.crt" "$demo/ca.crt"
targets_up=$(podman exec "$host" python3 -c "import json, urllib.request as u; t = json.load(u.urlopen('http://127.0.0.1:9090/api/v1/targets'))['data']['activeTargets']; print(sum(x['health'] == 'up' for x in t), 'of', len(t))" 2>/dev/null || echo "?")
cat <<MSG

Demo host '$host' is up at $ip (a podman container with systemd as PID 1):
  inferd.service  $(podman exec "$host" systemctl is-active inferd)  the runtime, on 127.0.0.1:8000 inside the host (hardened unit)
  nginx.service   $(podman exec "$host" systemctl is-active nginx)  the TLS gateway, https://$ip:443 (private CA: $demo/ca.crt)
  prometheus      $(podman exec "$host" systemctl is-active prometheus)  Prometheus, Alertmanager, node exporter on the host's loopback: $targets_up scrape targets up
                          (podman exec $host curl -s localhost:9090/api/v1/alerts, or an SSH tunnel on a real host)

One question through the gateway, from this machine, with the demo user key (openai client, TLS):
MSG
SSL_CERT_FILE="$demo/ca.crt" "$PROJECT_ROOT/.venv/bin/python" - "https://$ip/v1" "$user_key" <<'PY'
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2])
question = "What is the capital of France?"
r = client.chat.completions.create(model="smollm2-demo", messages=[{"role": "user", "content": question}],
                                   max_tokens=48, temperature=0)
print(f"  Q: {question}\n  A: {r.choices[0].message.content}\n  (finish_reason {r.choices[0].finish_reason}, "
      f"{r.usage.completion_tokens} tokens, model {r.model})")
PY
cat <<MSG


Try it yourself (demo keys: $demo/api-keys.json; the model is SmolLM2-135M-Instruct: small, so keep questions simple):
  KEY=\$(python3 -c "import json; print(json.load(open('$demo/api-keys.json'))[0]['key'])")
  curl --cacert $demo/ca.crt https://$ip/v1/chat/completions -H "Authorization: Bearer \$KEY" \\
    -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-demo", "messages": [{"role": "user", "content": "Name three primary colors."}], "max_tokens": 64}'
  SSL_CERT_FILE=$demo/ca.crt .venv/bin/python -c "import openai; c = openai.OpenAI(base_url='https://$ip/v1', api_key='\$KEY'); print(c.chat.completions.create(model='smollm2-demo', messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=16).choices[0].message.content)"
  re-run:     ansible-playbook site.yml -i inventory/demo      (idempotent: changed=0)
  tear down:  make demo-down
MSG
