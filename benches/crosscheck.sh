#!/usr/bin/env bash
# Cross-checks BENCHMARKS.md with a client that is not ours: wrk (C, event loop) drives the
# release binary as separate processes, `keybroker serve` (SQLite, or PostgreSQL with
# CROSSCHECK_DATABASE) with its `keybroker octopus-sim`, and a second `keybroker octopus-sim`
# for the direct creations; keybroker's own CPU is read from /proc/<pid>/stat.
#
# The yardstick is wrk's own CPU per request while it drives direct key creations against the
# simulator in the same run: a small fixed request and answer, nobody's code here, which moves
# with the machine's speed as keybroker does. Every CPU figure is also given in yardsticks.
#
#   apt-get install wrk                      # Debian's package
#   benches/crosscheck.sh [SECONDS]          # closed-loop runs of SECONDS each (default 10)
#
# Environment: KEYBROKER_BIN=path/to/keybroker compares another build (A/B);
# CROSSCHECK_DATABASE=postgres://postgres@127.0.0.1:5432/postgres runs keybroker on a fresh
# PostgreSQL database made there (and dropped after); CROSSCHECK_REQUESTERS (default 32);
# CROSSCHECK_OPEN_SECONDS (default 8), how long each open-loop rate is offered;
# CROSSCHECK_RATES (default "100 500 1000").
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
open_secs=${CROSSCHECK_OPEN_SECONDS:-8}
rates=${CROSSCHECK_RATES:-100 500 1000}
command -v wrk >/dev/null || { echo "wrk is not installed (Debian: apt-get install wrk)" >&2; exit 2; }
# The open-loop generator (wrk has no fixed-rate mode): the test kit's kb-load.
cargo build --release --quiet -p keybroker-testkit --bin kb-load
load=$PWD/target/release/kb-load
# KEYBROKER_BIN compares another build (A/B); by default this checkout's release build.
if [ -z "${KEYBROKER_BIN:-}" ]; then
    cargo build --release --quiet --bin keybroker
fi
bin=${KEYBROKER_BIN:-$PWD/target/release/keybroker}

dir=$(mktemp -d)
pids=()
pg_admin=""
pg_db=""
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "$pg_db" ]; then psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $pg_db" >/dev/null 2>&1 || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT

database=${CROSSCHECK_DATABASE:-sqlite}
if [ "$database" = sqlite ]; then
    db_url="sqlite://$dir/keybroker.db"
    backend=SQLite
else
    pg_admin=$database
    pg_db="kb_crosscheck_$$"
    psql -q "$pg_admin" -c "CREATE DATABASE $pg_db" >/dev/null
    db_url="${pg_admin%/*}/$pg_db"
    backend=PostgreSQL
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
sim_port=$(free_port)
kb_port=$(free_port)
broker_key=API-KEYBROKERDEVBROKERKEY00001 # the simulator's demo seed

"$bin" octopus-sim --port "$sim_port" >/dev/null 2>&1 &
pids+=($!)
sim_pid=$!
# The direct creations (the yardstick, and the baselines keybroker's latency is compared with)
# go to a simulator of their own, so that keybroker's Octopus holds only keybroker's keys: the
# direct runs make about 200,000, and the simulator's maps of keys, which grow by doubling,
# then stalled it for about 100 ms inside keybroker's open-loop windows.
direct_port=$(free_port)
start_direct_sim() {
    "$bin" octopus-sim --port "$direct_port" >/dev/null 2>&1 &
    pids+=($!)
    direct_pid=$!
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$direct_port/api" >/dev/null && break; sleep 0.1; done
    curl -fs "http://127.0.0.1:$direct_port/api" >/dev/null || {
        echo "the direct creations' simulator did not start on port $direct_port" >&2
        exit 1
    }
    local user
    user=$(curl -fs -H "X-Octopus-ApiKey: $broker_key" \
        "http://127.0.0.1:$direct_port/api/users?filter=svc-payments-deploy" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["Items"][0]["Id"])')
    direct_url="http://127.0.0.1:$direct_port/api/users/$user/apikeys"
}
start_direct_sim

printf '%s' "$broker_key" >"$dir/octopus-api-key"
printf '%s' "crosscheck-jwt-secret-0123456789abcdef0123456789" >"$dir/jwt-hs256"
printf '%s' "crosscheck-hmac-secret-0123456789abcdef0123456789" >"$dir/audit-hmac"
cat >"$dir/keybroker.toml" <<EOF
[server]
listen = "127.0.0.1:$kb_port"
# wrk is one principal sending thousands of requests a second.
rate_limit_per_minute = 0

[database]
url = "$db_url"

[octopus]
url = "http://127.0.0.1:$sim_port"
api_key_file = "octopus-api-key"
# keybroker's own pace towards Octopus (150 a minute by default) would measure the pace.
max_requests_per_minute = 0

[jobs]
reconcile_interval = "1h"

[auth]
issuer = "https://keybroker-dev.local/"
audience = "keybroker"
algorithms = ["HS256"]
hs256_secret_file = "jwt-hs256"
teams_claim = "groups"
auditor_teams = ["security"]

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

mint() { "$bin" mint-token --config "$dir/keybroker.toml" --ttl 2h "$@"; }
reader=$(mint --sub crosscheck-0@example.com --team payments)
auditor=$(mint --sub auditor@example.com --team security)
expires=$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)
direct_body="{\"Purpose\": \"crosscheck direct\", \"Expires\": \"$expires\"}"
issue_body='{"scope": "payments-deploy", "purpose": "crosscheck", "ttl": "1d"}'

cat >"$dir/direct.lua" <<EOF
wrk.method = "POST"
wrk.headers["X-Octopus-ApiKey"] = "$broker_key"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$direct_body'
EOF
# 32 requesters by default, as in `cargo bench --bench broker`; CROSSCHECK_REQUESTERS=1 sends
# every issuance as one requester, who then holds every key issued.
requesters=${CROSSCHECK_REQUESTERS:-32}
for i in $(seq 0 $((requesters - 1))); do
    mint --sub "crosscheck-$i@example.com" --team payments
done >"$dir/tokens"
{
    echo 'tokens = {'
    sed 's/.*/"&",/' "$dir/tokens"
    echo '}'
    cat <<EOF
n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$issue_body'
request = function()
  n = n + 1
  wrk.headers["Authorization"] = "Bearer " .. tokens[(n % #tokens) + 1]
  return wrk.format(nil)
end
EOF
} >"$dir/issue.lua"

# A warm-up, so that connections, the user cache and the database's first pages are in place,
# and the reader (crosscheck-0) holds more than a page of keys.
wrk -t2 -c32 -d1s -s "$dir/issue.lua" "http://127.0.0.1:$kb_port/v1/keys" >/dev/null

# Runs wrk (closed loop) and prints one line of figures for the report: its output, its own CPU
# (from getrusage of the child) and keybroker's and the simulators' CPU over the run (in each
# run only one simulator has work: the direct creations' or keybroker's).
measure() { # name, wrk arguments...
    local name=$1
    shift
    local kb0 sim0
    kb0=$(awk '{print $14 + $15}' "/proc/$kb_pid/stat")
    sim0=$(cat "/proc/$sim_pid/stat" "/proc/$direct_pid/stat" | awk '{s += $14 + $15} END {print s}')
    python3 - "$name" "$@" <<'EOF' >>"$dir/closed.txt"
import json, resource, subprocess, sys
name, argv = sys.argv[1], sys.argv[2:]
out = subprocess.run(["wrk", *argv], capture_output=True, text=True, check=True).stdout
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
def ms(text):
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit) and (unit != "s" or not text.endswith(("us", "ms"))):
            return float(text[: -len(unit)]) * f
    return float(text)
fig = {"name": name, "wrk_cpu_s": usage.ru_utime + usage.ru_stime}
for line in out.splitlines():
    p = line.split()
    if line.strip().startswith("50%"): fig["p50_ms"] = ms(p[1])
    if line.strip().startswith("99%"): fig["p99_ms"] = ms(p[1])
    if "requests in" in line: fig["requests"] = int(p[0])
    if line.startswith("Requests/sec"): fig["rps"] = float(p[1])
    if "Non-2xx" in line: fig["non2xx"] = int(p[-1])
print(json.dumps(fig))
EOF
    local kb1 sim1
    kb1=$(awk '{print $14 + $15}' "/proc/$kb_pid/stat")
    sim1=$(cat "/proc/$sim_pid/stat" "/proc/$direct_pid/stat" | awk '{s += $14 + $15} END {print s}')
    echo "{\"name\": \"$name\", \"kb_ticks\": $((kb1 - kb0)), \"sim_ticks\": $((sim1 - sim0))}" >>"$dir/cpu.txt"
}

kb="http://127.0.0.1:$kb_port"
measure "direct create (octopus-sim)" -t2 -c32 -d"${secs}s" --latency -s "$dir/direct.lua" "$direct_url"
# The benchmark's reference workload, beside the yardstick (the ratio `cargo bench` uses).
reference=$("$load" --reference)
measure "issuance" -t2 -c32 -d"${secs}s" --latency -s "$dir/issue.lua" "$kb/v1/keys"
measure "GET /v1/me" -t2 -c32 -d"${secs}s" --latency -H "Authorization: Bearer $reader" "$kb/v1/me"
measure "GET /v1/keys?limit=50" -t2 -c32 -d"${secs}s" --latency -H "Authorization: Bearer $reader" "$kb/v1/keys?limit=50"
measure "GET /v1/audit?actor=..&limit=50" -t2 -c32 -d"${secs}s" --latency -H "Authorization: Bearer $auditor" \
    "$kb/v1/audit?actor=crosscheck-0@example.com&limit=50"
measure "direct create, 1 connection" -t1 -c1 -d"${secs}s" --latency -s "$dir/direct.lua" "$direct_url"
measure "issuance, 1 connection" -t1 -c1 -d"${secs}s" --latency -s "$dir/issue.lua" "$kb/v1/keys"

# While each open loop runs, a probe asks that run's simulator for `GET /api` every 10 ms on one
# kept connection and prints its slowest answer: a stall of the simulator's own lands in
# whichever window it falls in, and is no part of keybroker's latency.
probe() { # port, seconds
    python3 - "$1" "$2" <<'PY'
import http.client, sys, time
port, end, slowest = int(sys.argv[1]), time.monotonic() + float(sys.argv[2]), 0.0
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
while time.monotonic() < end:
    t = time.monotonic()
    try:
        conn.request("GET", "/api")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        # An answer that never came (or a dropped connection) counts as slow as it was.
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    slowest = max(slowest, time.monotonic() - t)
    time.sleep(0.01)
print(f"{slowest * 1e3:.1f}")
PY
}
open_loop() { # target name, simulator port, kb-load arguments...
    local target=$1 port=$2 slowest probe_pid
    shift 2
    probe "$port" "$open_secs" >"$dir/probe.txt" &
    probe_pid=$!
    "$load" "$@" | sed "s/^{/{\"target\": \"$target\", /" >"$dir/one.txt"
    wait "$probe_pid" || true
    slowest=$(cat "$dir/probe.txt")
    slowest=${slowest:-0}
    sed "s/^{/{\"sim_slowest_ms\": $slowest, /" "$dir/one.txt" >>"$dir/open.txt"
}
# The direct baselines start again on a fresh simulator (the closed loops left it about 200,000
# keys): the baselines, too, should carry no stall of the simulator's own growth.
kill "$direct_pid"
wait "$direct_pid" 2>/dev/null || true
for i in "${!pids[@]}"; do [ "${pids[$i]}" = "$direct_pid" ] && unset "pids[$i]"; done
start_direct_sim
for rate in $rates; do
    open_loop direct "$direct_port" --url "$direct_url" --method POST --rate "$rate" --seconds "$open_secs" \
        --header "X-Octopus-ApiKey: $broker_key" --body "$direct_body"
    open_loop keybroker "$sim_port" --url "$kb/v1/keys" --method POST --rate "$rate" --seconds "$open_secs" \
        --tokens "$dir/tokens" --body "$issue_body"
done
peak=$(awk '/VmHWM/ {print $2}' "/proc/$kb_pid/status")
page_bytes=$(curl -fs -H "Authorization: Bearer $reader" "$kb/v1/keys?limit=50" | wc -c)

python3 - "$dir" "$backend" "$secs" "$open_secs" "$requesters" "$peak" "$page_bytes" "$reference" <<'EOF'
import json, sys
d, backend, secs, open_secs, requesters, peak_kb, page_bytes, reference = sys.argv[1:]
closed = [json.loads(l) for l in open(f"{d}/closed.txt")]
cpu = {c["name"]: c for c in map(json.loads, open(f"{d}/cpu.txt"))}
opened = [json.loads(l) for l in open(f"{d}/open.txt")]
sqlite = backend == "SQLite"
direct = closed[0]
yardstick_us = direct["wrk_cpu_s"] * 1e6 / direct["requests"]
sim_direct_us = cpu[direct["name"]]["sim_ticks"] * 1e4 / direct["requests"]
print(f"wrk, closed loop {secs} s each ({requesters} requesters for issuances); keybroker serve ({backend}) "
      f"with its keybroker octopus-sim, and a second keybroker octopus-sim for the direct creations, "
      f"as processes; CPU from /proc/<pid>/stat")
print(f"\nYardstick: wrk's CPU per direct create = {yardstick_us:.2f} µs "
      f"(the simulator's own CPU per direct create: {sim_direct_us:.1f} µs = {sim_direct_us / yardstick_us:.2f} yardsticks; "
      f"the benchmark's reference workload: {float(reference):.0f} µs = {float(reference) / yardstick_us:.0f} yardsticks)\n")
print("| run | connections | requests | throughput | p50 | p99 | non-2xx | keybroker CPU/request | yardsticks |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
per = {}
for f in closed:
    c = cpu[f["name"]]
    conns = 1 if "1 connection" in f["name"] else 32
    if f["name"].startswith("direct"):
        kb_cpu = "-"
        ys = "-"
    else:
        us = c["kb_ticks"] * 1e4 / f["requests"]
        per[f["name"]] = us / yardstick_us
        kb_cpu, ys = f"{us:.0f} µs", f"{us / yardstick_us:.1f}"
    print(f"| {f['name']} | {conns} | {f['requests']} | {f['rps']:.0f}/s | {f['p50_ms']:.2f} ms | {f['p99_ms']:.2f} ms "
          f"| {f.get('non2xx', 0)} | {kb_cpu} | {ys} |")
print(f"\n50-record page: {page_bytes} bytes. keybroker peak RSS (VmHWM): {int(peak_kb) / 1024:.1f} MB")
print(f"\nOpen loop (kb-load: requests started at a fixed rate, latency from each one's due time), {open_secs} s a rate\n")
print("| offered | direct p50 | p99 | p99.9 | keybroker p50 | p99 | p99.9 | failed | p99 overhead "
      "| simulator's slowest `GET /api` (direct / keybroker window) |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
overhead = {}
for dr, kr in zip(opened[0::2], opened[1::2]):
    o = kr["p99_ms"] - dr["p99_ms"]
    overhead[int(kr["rate"])] = o
    print(f"| {kr['rate']:.0f}/s | {dr['p50_ms']:.2f} ms | {dr['p99_ms']:.2f} ms | {dr['p999_ms']:.2f} ms | {kr['p50_ms']:.2f} ms "
          f"| {kr['p99_ms']:.2f} ms | {kr['p999_ms']:.2f} ms | {dr['failed'] + kr['failed']} | {o:.2f} ms "
          f"| {dr['sim_slowest_ms']:.1f} / {kr['sim_slowest_ms']:.1f} ms |")
one = {f["name"]: f for f in closed}
serial = one["issuance, 1 connection"]["p50_ms"] - one["direct create, 1 connection"]["p50_ms"]
targets = [
    (f"issuance ≤ {15 if sqlite else 20} yardsticks", per["issuance"], 15 if sqlite else 20, "{:.1f}"),
    ("GET /v1/me ≤ 2.5 yardsticks", per["GET /v1/me"], 2.5, "{:.1f}"),
    ("50-record GET /v1/keys page ≤ 8 yardsticks", per["GET /v1/keys?limit=50"], 8, "{:.1f}"),
    ("audit page ≤ 10 yardsticks", per["GET /v1/audit?actor=..&limit=50"], 10, "{:.1f}"),
    (f"issuance p99 overhead at 500/s ≤ {5 if sqlite else 10} ms", overhead.get(500, float("inf")), 5 if sqlite else 10, "{:.2f} ms"),
    (f"1-caller issuance p50 overhead ≤ {0.5 if sqlite else 1.5} ms", serial, 0.5 if sqlite else 1.5, "{:.2f} ms"),
    ("peak RSS ≤ 48 MB", int(peak_kb) / 1024, 48, "{:.1f} MB"),
]
stalled = [f"{kr['rate']:.0f}/s" for kr in opened[1::2] if kr["sim_slowest_ms"] >= 50]
if stalled:
    print(f"\nThe simulator itself took 50 ms or more to answer `GET /api` while keybroker's open loop ran "
          f"at {', '.join(stalled)}: that window's p99 carries the simulator's stall.")
print()
for name, value, limit, fmt in targets:
    print(f"{'PASS' if value <= limit else 'MISS'}: {name} (measured {fmt.format(value)})")
EOF
