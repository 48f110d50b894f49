#!/usr/bin/env bash
# Route benchmark: add -> usable route latency, memory of 10,000 routes,
# snapshot lookup time. Loopback and temporary files only; stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin sandboxd --example route_bench
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
ssh-keygen -q -t ed25519 -N '' -C bench -f "$work/key"
./target/release/sandboxd serve --state-dir "$work/state" --admin-socket "$work/admin.sock" \
  --ssh-listen 127.0.0.1:0 --https-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 2>"$work/log" &
pid=$!
for _ in $(seq 100); do [ -S "$work/admin.sock" ] && break; sleep 0.05; done
./target/release/examples/route_bench "$work/admin.sock" "$work/key.pub"
