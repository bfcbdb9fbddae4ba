#!/usr/bin/env bash
# Every BENCHMARKS.md row in one run, side by side: raw echo server, emulator and proxy, same client.
# Usage: scripts/benchmarks.sh [SECONDS]   (needs `make var`; ports 1500, 1501, 1599, 8583, 9100, 9998 free)
# The proxy runs on config.toml with max_connections raised for the idle-connection row and, unless
# AUDIT=off, the HMAC-chained audit trail on (fsync per batch, into a temp dir): every answered request
# writes a record whose MAC a node computes, as in production.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-8}
HP=${HP:-.venv/bin/hsmproxy}
AUDIT=${AUDIT:-on}
TMP=$(mktemp -d)
CONFIG=.bench-config.toml  # next to config.toml, so its relative paths hold
sed 's/^max_connections = 1000/max_connections = 2000/' config.toml > "$CONFIG"
if [ "$AUDIT" != off ]; then
  printf '\n[audit]\npath = "%s/audit/audit.jsonl"\nfsync = "batch"\nkey_id = "00"\n' "$TMP" >> "$CONFIG"
fi
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP" "$CONFIG"; }
trap cleanup EXIT
$HP bench --echo-server 127.0.0.1:1599 & pids+=($!)
$HP --log-level WARNING emulator --listen 127.0.0.1:1501 & pids+=($!)
$HP --log-level WARNING serve --config "$CONFIG" 2> >(tee "$TMP/proxy.log" >&2) & PROXY=$!; pids+=($PROXY)
for port in 1599 1501 1500 8583; do
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.2; done
done
sleep 2
row() { echo "\$ hsmproxy bench $*"; $HP bench "$@"; }
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
echo "## $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $(uname -r), commit $(git rev-parse --short HEAD), audit $AUDIT"
idle_rss "fresh (hot keys only)"
for t in 127.0.0.1:1599 127.0.0.1:1501 127.0.0.1:1500; do row --target $t --command CC --connections 8 --depth 1 --duration "$D"; done
for t in 127.0.0.1:1599 127.0.0.1:1501 127.0.0.1:1500; do row --target $t --command CC --connections 8 --depth 8 --duration "$D"; done
for t in 127.0.0.1:1501 127.0.0.1:1500; do row --target $t --command CC --connections 8 --depth 4 --keys cold --duration "$D"; done
row --target 127.0.0.1:1501 --command EW --connections 8 --depth 2 --duration 3
row --target 127.0.0.1:1500 --command EW --connections 8 --depth 2 --duration "$D"
row --target 127.0.0.1:8583 --command iso --connections 8 --depth 1 --duration "$D"
row --target 127.0.0.1:8583 --command iso --connections 8 --depth 8 --duration "$D"
row --target 127.0.0.1:1500 --command CC --rate 5000 --connections 8 --duration "$D"
row --target 127.0.0.1:1500 --command CC --rate 10000 --connections 16 --duration "${OPEN_SECONDS:-60}"
# let the proxy drain what the overload left queued before the idle row asks NC on 1,000 connections
for _ in $(seq 30); do $HP bench --target 127.0.0.1:1500 --command NC --connections 1 --depth 1 --duration 0.5 2>/dev/null | grep -q "errors 0" && break; sleep 1; done
idle_rss "end of run (both key caches full)"
echo "node ejections logged by the proxy: $(grep -c 'ejected for' "$TMP/proxy.log" || true)"
if [ "$AUDIT" != off ]; then
  echo "audit records written during the run: $(cat "$TMP"/audit/audit.jsonl* | wc -l)," \
    "gap records (records lost): $(cat "$TMP"/audit/audit.jsonl* | grep -c '"kind":"gap"' || true)"
fi
