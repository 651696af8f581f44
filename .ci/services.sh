#!/usr/bin/env bash
# Install the system programs that tests drive, on a fresh Debian machine (run as root by
# .ci/run before the test suite; harmless to run again: it installs only what is missing).
#
#   slurmctld slurmd slurm-client munge   tests/test_slurm.py (a real one-node Slurm)
#   chromium                              tests/test_monitor_browser.py (headless browser)
#
# It starts nothing: the tests start their own munged, slurmctld and slurmd, each with a
# private key, config, state directory and loopback ports, and stop them when they end
# (tests/slurm_util.py). Daemons that the packages would start on installation are held back
# with a policy-rc.d while installing.
set -euo pipefail

need=()
have() { command -v "$1" > /dev/null 2>&1 || [[ -x /usr/sbin/$1 || -x /usr/bin/$1 ]]; }
have slurmctld || need+=(slurmctld)
have slurmd || need+=(slurmd)
have sbatch || need+=(slurm-client)
{ have munged && have mungekey; } || need+=(munge)
have chromium || need+=(chromium)

if (( ${#need[@]} == 0 )); then
    echo "services.sh: slurm, munge and chromium already installed"
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "services.sh: need root to install ${need[*]}" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=1
fi
# shellcheck disable=SC2317  # (run by the trap)
cleanup() { (( own_policy )) && rm -f "$policy"; return 0; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
for attempt in 1 2 3; do
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; then
        echo "services.sh: installed ${need[*]}"
        exit 0
    fi
    echo "services.sh: apt-get failed (attempt $attempt of 3)" >&2
    sleep $(( attempt * 10 ))
done
echo "services.sh: could not install ${need[*]}" >&2
exit 1
