#!/usr/bin/env bash
# Runs every hl7edge test on a fresh Debian 12 machine as root: installs what is missing
# (apt with --no-install-recommends, a Python venv with third-party HL7 peers), then
# formatting, lints, unit and integration tests, unit-file checks and a fuzz smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TERM_COLOR=never

step() { printf '\n=== %s ===\n' "$*"; }

# --- system packages -------------------------------------------------------------------------
need_pkgs=()
command -v socat >/dev/null || need_pkgs+=(socat)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v python3 >/dev/null || need_pkgs+=(python3 python3-venv)
# TPM 2.0: with `--features tpm` the tss-esapi crate builds against libtss2-dev through
# pkg-config; tests/tpm.rs drives swtpm, swtpm_ioctl and tpm2_pcrextend.
command -v pkg-config >/dev/null || need_pkgs+=(pkg-config)
pkg-config --exists tss2-esys 2>/dev/null || need_pkgs+=(libtss2-dev)
command -v swtpm >/dev/null || need_pkgs+=(swtpm)
command -v swtpm_ioctl >/dev/null || need_pkgs+=(swtpm-tools)
command -v tpm2_pcrextend >/dev/null || need_pkgs+=(tpm2-tools)
# systemd-analyze verifies the unit file below.
command -v systemd-analyze >/dev/null || need_pkgs+=(systemd)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  step "apt-get install ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

# --- Python venv with the third-party peers ---------------------------------------------------
VENV=$ROOT/tests/.venv
if ! "$VENV/bin/python" -c 'import hl7, hl7apy' 2>/dev/null; then
  step "python venv with python-hl7 and hl7apy"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check 'hl7==0.4.5' 'hl7apy==1.3.5'
fi
export HL7EDGE_TEST_VENV=$VENV
# libtss2 logs every failed TPM command to stderr; the tests check hl7edge's own errors.
export TSS2_LOG=all+NONE

# --- Rust checks and tests --------------------------------------------------------------------
if command -v rustup >/dev/null; then
  for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" \
      || rustup component add "$component"
  done
fi
step "cargo fmt --check"
cargo fmt --check
# Lints for both builds: the default one (what `cargo run -- demo` builds; pkg-config pointed
# nowhere proves it needs no libtss2) and the box's one with the TPM sealer, which the tests run.
step "cargo clippy --all-targets -- -D warnings (default and --features tpm)"
PKG_CONFIG_LIBDIR=/nonexistent cargo clippy --all-targets --quiet -- -D warnings
cargo clippy --all-targets --features tpm --quiet -- -D warnings
step "cargo test --features tpm (unit and integration)"
cargo test --features tpm --quiet -- --test-threads=2 2>&1 | tee /tmp/hl7edge-test.log
grep -q "test result: FAILED" /tmp/hl7edge-test.log && exit 1
step "cargo test --lib (unit tests of the default build: a TPM config is refused there)"
PKG_CONFIG_LIBDIR=/nonexistent cargo test --lib --quiet -- --test-threads=2

# --- systemd unit --------------------------------------------------------------------------
step "systemd-analyze verify systemd/hl7edge.service"
if command -v systemd-analyze >/dev/null; then
  unit_dir=$(mktemp -d)
  sed "s|/usr/bin/hl7edge|$ROOT/target/debug/hl7edge|g" systemd/hl7edge.service > "$unit_dir/hl7edge.service"
  systemd-analyze verify "$unit_dir/hl7edge.service"
  rm -rf "$unit_dir"
else
  echo "systemd-analyze missing after installing systemd" >&2; exit 1
fi

# --- fuzz smoke run ---------------------------------------------------------------------------
step "fuzz smoke"
tests/fuzz_smoke.sh
echo
echo "all tests passed"
