#!/usr/bin/env bash
# The system packages some tests need, installed when missing: `make test` and .ci/run run this.
#
#   Slurm (slurmctld, slurmd, slurm-client) + munge: tests/test_slurm.py (a two-node Slurm on this host)
#   chromium + fonts-dejavu-core:                     tests/test_report.py (the report in a real browser)
#
# Installs only as root with apt-get (Debian/Ubuntu); otherwise it says why it skips and the tests
# that need a package skip, saying so too. Idempotent, and quick (no apt-get at all) when all is there.
# Exits 0 whatever happens: a missing optional package must not stop the rest of the suite.
set -uo pipefail

say() { echo "install_system_deps: $*" >&2; }

missing=()
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
  missing+=(slurmctld slurmd slurm-client)
fi
if ! command -v munged >/dev/null; then missing+=(munge); fi
if ! command -v chromium >/dev/null; then missing+=(chromium); fi
# Without a font Chromium renders the report's text as boxes. Only dpkg can tell whether it is there.
if command -v dpkg-query >/dev/null \
   && [ "$(dpkg-query -W -f='${Status}' fonts-dejavu-core 2>/dev/null)" != "install ok installed" ]; then
  missing+=(fonts-dejavu-core)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  say "not root: not installing ${missing[*]}; the Slurm and browser tests that need them will skip"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  say "no apt-get: not installing ${missing[*]}; the Slurm and browser tests that need them will skip"
  exit 0
fi
say "installing ${missing[*]}"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         "${missing[@]}" >/dev/null; }; then
  say "could not install ${missing[*]}: the tests that need them will skip"
fi
exit 0
