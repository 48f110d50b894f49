#!/usr/bin/env bash
# The abuse benchmarks of the security model, in one command (loopback only,
# bounded; a few minutes in all). Builds the release daemon once, then runs:
#   bench/abuse/login.sh  a correct agent login from one address while another
#                         sends wrong passwords at 256 concurrency (p50/p99
#                         against the unloaded latency);
#   bench/abuse/https.sh  one address holding 300 stalled HTTPS connections
#                         (bare TCP, TLS idle, HTTP/2 without preface): another
#                         address's page latency, and how many were accepted;
#   bench/abuse/ssh.sh    400 stalled forwarded SSH channels of one sandbox:
#                         the daemon's RSS, another sandbox's latency and
#                         throughput; 300 stalled pre-auth connections from one
#                         address: another address's login time.
# Each prints its own table; figures are recorded in BENCHMARKS.md.
#
# Usage: bench/abuse.sh [login|https|ssh]...   (all three by default)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
parts=("$@")
[ "${#parts[@]}" -gt 0 ] || parts=(login https ssh)
for part in "${parts[@]}"; do
  [ -f "$ROOT/bench/abuse/$part.sh" ] || { echo "no such part: $part (login, https, ssh)" >&2; exit 2; }
done

echo "building sandboxd (release)..." >&2
(cd "$ROOT" && cargo build --quiet --release --bin sandboxd)
# The parts take the binary under either name and skip their own build.
export SBX="$ROOT/target/release/sandboxd" BIN="$ROOT/target/release/sandboxd"

status=0
for part in "${parts[@]}"; do
  echo
  echo "=== bench/abuse/$part.sh"
  bash "$ROOT/bench/abuse/$part.sh" || { echo "bench/abuse/$part.sh failed" >&2; status=1; }
done
exit "$status"
