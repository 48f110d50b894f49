#!/usr/bin/env bash
# Runs every check of the project on a fresh Debian 12 machine (as root):
# installs what the tests need, then shellcheck, formatting, lints, all
# tests, and last the README's one-command start (scripts/demo.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# A test whose system component (root, incusd, sshd, Pebble, Chromium...)
# is absent skips with its reason under a plain `cargo test`; here such a
# skip fails the test, so that CI never passes by skipping.
export SANDBOXD_SYSTEM_TESTS=require

if [ "$(id -u)" = 0 ]; then
  for setup in .ci/setup-*.sh; do
    [ -e "$setup" ] || continue
    echo "== $setup"
    bash "$setup"
  done
else
  echo "not root: skipping package setup; the tests expect its tools installed" >&2
fi

echo "== shellcheck"
git ls-files -z '*.sh' | xargs -0 shellcheck
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast
echo "== the README's first command: bash scripts/demo.sh"
if [ "$(id -u)" = 0 ]; then
  # The base image recipe is the test image's: reuse its tarballs.
  DEMO_BASE_DIR=/var/cache/sandboxd-test/debian-ssh-v2 bash scripts/demo.sh
else
  echo "not root: the one-command start needs root; not run" >&2
  exit 1
fi
