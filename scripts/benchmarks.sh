#!/usr/bin/env bash
# Every BENCHMARKS.md row in one run, side by side: raw echo server, emulator and proxy, same client.
# Usage: scripts/benchmarks.sh [SECONDS]   (needs `make var`; ports 1500, 1501, 1599, 8583, 9100, 9998 free)
# The proxy runs on config.toml (audit trail on, as by default: hash chain, checkpoints signed by the
# nodes, fsync per batch) with its trail in a temp dir and max_connections raised for the idle row;
# AUDIT=off removes [audit] for the twin run. The open-loop rows offer 0.7x, 2x and 4x the capacity this
# same run measured (CC closed loop, 8 x 8), OPEN_SECONDS (60) each, then 5 s at 0.5x to see recovery.
# ACK=off skips the ack_after_durable rows (a second proxy start).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-8}
HP=${HP:-.venv/bin/hsmproxy}
PY=${PY:-.venv/bin/python}
AUDIT=${AUDIT:-on}
ACK=${ACK:-on}
OPEN=${OPEN_SECONDS:-60}
TMP=$(mktemp -d)
CONFIG=.bench-config.toml  # next to config.toml, so its relative paths hold
make_config() {  # $1: audit on|off, $2: ack_after_durable true|false
  sed 's/^max_connections = 1000/max_connections = 2000/' config.toml > "$CONFIG"
  if [ "$1" = off ]; then
    $PY - "$CONFIG" <<'EOF'
import re, sys
p = sys.argv[1]
text = open(p).read()
open(p, "w").write(re.sub(r"\n\[audit\]\n(?:[^\[\n][^\n]*\n|\n)*", "\n", text, count=1))
EOF
  else
    sed -i "s#^path = \"var/audit/audit.jsonl\"#path = \"$TMP/audit/audit.jsonl\"#; s#^ack_after_durable = .*#ack_after_durable = $2#" "$CONFIG"
  fi
}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP" "$CONFIG"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 150); do (echo > /dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.2; done; return 1; }
start_proxy() {
  $HP --log-level WARNING serve --config "$CONFIG" 2> >(tee -a "$TMP/proxy.log" >&2) & PROXY=$!; pids+=($PROXY)
  wait_port 1500; wait_port 8583; sleep 2
}
stop_proxy() { kill "$PROXY"; wait "$PROXY" 2>/dev/null || true; }
row() { echo "\$ hsmproxy bench $*"; $HP bench "$@"; }
# one row as JSON (kept for the arithmetic) and its summary line
jrow() { echo "\$ hsmproxy bench $*" >&2; $HP bench "$@" --json | tee -a "$TMP/rows.jsonl"; }
field() { $PY -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
summary() {  # the acceptance figures of an open-loop row with a recovery phase
  $PY - "$1" "$2" <<'EOF'
import json, sys
r, capacity = json.loads(sys.argv[1]), float(sys.argv[2])
print(f"  offered {r['offered_rate']:,.0f}/s (asked {r['rate']:,.0f}/s), answered 00 {r['tps']:,.0f}/s = "
      f"{r['tps'] / capacity:.2f} x capacity, errors {r['errors']} {r['error_codes'] or ''}, "
      f"unanswered {r['unanswered']}, resets {r['resets']}, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
      f"recovery (p99 < 10 ms) after {r.get('recovery_s')} s")
EOF
}
# resident memory of the front and its workers while 1,000 idle connections are open (and 8 busy)
idle_rss() {
  $HP bench --target 127.0.0.1:1500 --command CC --connections 8 --depth 1 --idle 1000 --duration "$D" > "$TMP/idle" &
  local idle=$! workers rss
  sleep $((D / 2 + 3))
  workers=$(pgrep -P "$PROXY" | paste -sd, -)
  rss=$(ps -o rss= -p "$PROXY,$workers" | awk '{s += $1} END {printf "%.0f", s / 1024}')
  wait $idle
  echo "\$ hsmproxy bench --target 127.0.0.1:1500 --command CC --connections 8 --depth 1 --idle 1000 --duration $D"
  cat "$TMP/idle"
  echo "RSS front + workers with 1,000 idle connections (and 8 busy), $1: ${rss} MB"
}

make_config "$AUDIT" false
$HP bench --echo-server 127.0.0.1:1599 & pids+=($!)
$HP --log-level WARNING emulator --listen 127.0.0.1:1501 & pids+=($!)
wait_port 1599; wait_port 1501
start_proxy
echo "## $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $(uname -r), commit $(git rev-parse --short HEAD), audit $AUDIT"
idle_rss "fresh (hot keys only)"
for t in 127.0.0.1:1599 127.0.0.1:1501 127.0.0.1:1500; do row --target $t --command CC --connections 8 --depth 1 --duration "$D"; done
for t in 127.0.0.1:1599 127.0.0.1:1501; do row --target $t --command CC --connections 8 --depth 8 --duration "$D"; done
cap_row=$(jrow --target 127.0.0.1:1500 --command CC --connections 8 --depth 8 --duration "$D")
CAP=$(field "$cap_row" tps)
echo "capacity (CC closed loop 8 x 8, this run): $CAP TPS"
for t in 127.0.0.1:1501 127.0.0.1:1500; do row --target $t --command CC --connections 8 --depth 4 --keys cold --duration "$D"; done
row --target 127.0.0.1:1501 --command EW --connections 8 --depth 2 --duration 3
row --target 127.0.0.1:1500 --command EW --connections 8 --depth 2 --duration "$D"
row --target 127.0.0.1:8583 --command iso --connections 8 --depth 1 --duration "$D"
row --target 127.0.0.1:8583 --command iso --connections 8 --depth 8 --duration "$D"
for x in 0.7 2 4; do
  rate=$($PY -c "print(round($CAP * $x))")
  then=$($PY -c "print(round($CAP * 0.5))")
  echo "open loop at ${x} x capacity, ${OPEN} s, then 5 s at 0.5 x:"
  r=$(jrow --target 127.0.0.1:1500 --command CC --connections 16 --rate "$rate" --duration "$OPEN" \
        --then-rate "$then" --then-duration 5 --recovery-p99-ms 10)
  summary "$r" "$CAP"
done
# let the proxy settle before the idle row asks NC on 1,000 connections
sleep 3
idle_rss "end of run (both key caches full)"
echo "node ejections logged by the proxy: $(grep -c 'ejected for' "$TMP/proxy.log" || true)"
if [ "$AUDIT" != off ]; then
  stop_proxy
  echo "audit lines written during the run: $(cat "$TMP"/audit/audit.jsonl* | wc -l), gap records (records lost):" \
    "$(cat "$TMP"/audit/audit.jsonl* | grep -c '"kind":"gap"' || true)"
  echo "\$ hsmproxy audit verify (the whole run's trail, offline)"
  $HP audit verify "$TMP"/audit/audit.jsonl* --keys var/audit/keys.pem | tail -1
  if [ "$ACK" != off ]; then
    echo "## ack_after_durable = true (an answer leaves once its record is on disk), same machine, same minute"
    make_config on true
    start_proxy
    for d in 1 8; do row --target 127.0.0.1:1500 --command CC --connections 8 --depth $d --duration "$D"; done
    row --target 127.0.0.1:1500 --command CC --connections 64 --depth 1 --duration "$D"
    row --target 127.0.0.1:8583 --command iso --connections 8 --depth 8 --duration "$D"
    stop_proxy
  fi
fi
