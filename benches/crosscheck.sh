#!/usr/bin/env bash
# Cross-checks BENCHMARKS.md with a client that is not ours: wrk (C, event loop) drives the
# release binary as separate processes, `keybroker octopus-sim` and `keybroker serve` (SQLite),
# first with direct key creations against the simulator, then with issuances through keybroker,
# then GET /v1/me. Each run is time-bounded (wrk -d), 32 connections on 2 threads.
#
#   apt-get install wrk          # Debian's package
#   benches/crosscheck.sh [SECONDS]          # KEYBROKER_BIN=path/to/keybroker for another build
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
command -v wrk >/dev/null || { echo "wrk is not installed (Debian: apt-get install wrk)" >&2; exit 2; }
# KEYBROKER_BIN compares another build (A/B); by default this checkout's release build.
if [ -z "${KEYBROKER_BIN:-}" ]; then
    cargo build --release --quiet
fi
bin=${KEYBROKER_BIN:-$PWD/target/release/keybroker}

dir=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
sim_port=$(free_port)
kb_port=$(free_port)
broker_key=API-KEYBROKERDEVBROKERKEY00001 # the simulator's demo seed

"$bin" octopus-sim --port "$sim_port" >/dev/null 2>&1 &
pids+=($!)

printf '%s' "$broker_key" >"$dir/octopus-api-key"
printf '%s' "crosscheck-jwt-secret-0123456789abcdef0123456789" >"$dir/jwt-hs256"
printf '%s' "crosscheck-hmac-secret-0123456789abcdef0123456789" >"$dir/audit-hmac"
cat >"$dir/keybroker.toml" <<EOF
[server]
listen = "127.0.0.1:$kb_port"
# wrk is one principal sending thousands of requests a second.
rate_limit_per_minute = 0

[database]
url = "sqlite://$dir/keybroker.db"

[octopus]
url = "http://127.0.0.1:$sim_port"
api_key_file = "octopus-api-key"

[jobs]
reconcile_interval = "1h"

[auth]
issuer = "https://keybroker-dev.local/"
audience = "keybroker"
algorithms = ["HS256"]
hs256_secret_file = "jwt-hs256"
teams_claim = "groups"

[audit]
hmac_secret_file = "audit-hmac"

[[scopes]]
name = "payments-deploy"
octopus_user = "svc-payments-deploy"
teams = ["payments"]
default_ttl = "7d"
max_ttl = "30d"
max_active_keys_per_requester = 1000000
EOF

for _ in $(seq 100); do curl -fs "http://127.0.0.1:$sim_port/api" >/dev/null && break; sleep 0.1; done
"$bin" serve --config "$dir/keybroker.toml" >/dev/null 2>&1 &
pids+=($!)
kb_pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$kb_port/healthz" >/dev/null && break; sleep 0.1; done

token=$("$bin" mint-token --config "$dir/keybroker.toml" --sub crosscheck@example.com --team payments --ttl 2h)
user_id=$(curl -fs -H "X-Octopus-ApiKey: $broker_key" \
    "http://127.0.0.1:$sim_port/api/users?filter=svc-payments-deploy" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["Items"][0]["Id"])')
expires=$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)

cat >"$dir/direct.lua" <<EOF
wrk.method = "POST"
wrk.headers["X-Octopus-ApiKey"] = "$broker_key"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"Purpose": "crosscheck direct", "Expires": "$expires"}'
EOF
# 32 requesters by default, as in `cargo bench --bench broker`; CROSSCHECK_REQUESTERS=1 sends
# every issuance as one requester, who then holds every key issued.
requesters=${CROSSCHECK_REQUESTERS:-32}
{
    echo 'tokens = {'
    for i in $(seq 0 $((requesters - 1))); do
        echo "\"$("$bin" mint-token --config "$dir/keybroker.toml" --sub "crosscheck-$i@example.com" --team payments --ttl 2h)\","
    done
    echo '}'
    cat <<'EOF'
n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"scope": "payments-deploy", "purpose": "crosscheck", "ttl": "1d"}'
request = function()
  n = n + 1
  wrk.headers["Authorization"] = "Bearer " .. tokens[(n % #tokens) + 1]
  return wrk.format(nil)
end
EOF
} >"$dir/issue.lua"

# A warm-up, so that connections, the user cache and the database's first pages are in place.
wrk -t2 -c32 -d1s -s "$dir/issue.lua" "http://127.0.0.1:$kb_port/v1/keys" >/dev/null

summary() { # name, wrk output
    local rps p50 p99 non2xx
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$2")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$2")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$2")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$2")
    printf '| %s | %s/s | %s | %s | %s |\n' "$1" "${rps%.*}" "$p50" "$p99" "${non2xx:-0}"
}

direct=$(wrk -t2 -c32 -d"${secs}s" --latency -s "$dir/direct.lua" "http://127.0.0.1:$sim_port/api/users/$user_id/apikeys")
issue=$(wrk -t2 -c32 -d"${secs}s" --latency -s "$dir/issue.lua" "http://127.0.0.1:$kb_port/v1/keys")
me=$(wrk -t2 -c32 -d"${secs}s" --latency -H "Authorization: Bearer $token" "http://127.0.0.1:$kb_port/v1/me")
peak=$(awk '/VmHWM/ {print $2}' "/proc/$kb_pid/status")

echo "wrk, 32 connections, ${secs} s each, $requesters requester(s); keybroker serve (SQLite) and keybroker octopus-sim as processes"
echo
echo "| run | throughput | p50 | p99 | non-2xx |"
echo "|---|---:|---:|---:|---:|"
summary "direct create (octopus-sim)" "$direct"
summary "issuance via keybroker" "$issue"
summary "GET /v1/me" "$me"
rps() { awk '/Requests\/sec/ {print $2}' <<<"$1"; }
python3 - "$(rps "$direct")" "$(rps "$issue")" <<'EOF'
import sys
direct, issue = map(float, sys.argv[1:])
print(f"\nRatio (keybroker / direct) of throughput: {issue / direct:.3f}")
EOF
echo "keybroker peak RSS (VmHWM): $((peak / 1024)) MB"
