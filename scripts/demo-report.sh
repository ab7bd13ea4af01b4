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

One chat completion through the gateway, from this machine, with the demo user key:
MSG
curl -sS --cacert "$demo/ca.crt" "https://$ip/v1/chat/completions" \
  -H "Authorization: Bearer $user_key" -H 'Content-Type: application/json' \
  -d '{"model": "deepseek-demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}' | sed 's/^/  /'
cat <<MSG


Try it yourself (demo keys: $demo/api-keys.json; the model is random weights, so the text is noise):
  KEY=\$(python3 -c "import json; print(json.load(open('$demo/api-keys.json'))[0]['key'])")
  curl --cacert $demo/ca.crt https://$ip/v1/chat/completions -H "Authorization: Bearer \$KEY" \\
    -H 'Content-Type: application/json' \\
    -d '{"model": "deepseek-demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}'
  SSL_CERT_FILE=$demo/ca.crt .venv/bin/python -c "import openai; c = openai.OpenAI(base_url='https://$ip/v1', api_key='\$KEY'); print(c.chat.completions.create(model='deepseek-demo', messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=16).choices[0].message.content)"
  re-run:     ansible-playbook site.yml -i inventory/demo      (idempotent: changed=0)
  tear down:  make demo-down
MSG
