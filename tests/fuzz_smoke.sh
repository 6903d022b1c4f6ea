#!/usr/bin/env bash
# Fuzz smoke run: each cargo-fuzz target for a short time from the seed corpus. When cargo-fuzz
# cannot be installed, the seeds are replayed by the unit tests instead (tests/fuzz_replay.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${FUZZ_SECS:-20}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet || {
    echo "cargo-fuzz unavailable: seed corpus replayed by tests/fuzz_replay.rs only"
    exit 0
  }
fi
cd fuzz
for target in deframer parser; do
  corpus=$(mktemp -d)
  cp seeds/* "$corpus"/
  # RUSTC_BOOTSTRAP only for the fuzz build (sanitizer flags need it); never for the product.
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$corpus" -- -max_total_time="$SECS" -max_len=4096 2>&1 | tail -n 3
  rm -rf "$corpus"
done
