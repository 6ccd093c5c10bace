#!/usr/bin/env bash
# Installs the Debian packages the cluster tests need (sshd, rsync, nc for `ray up`; Slurm and munge), only those
# missing. Idempotent; never fails: where it cannot install, it says why and the tests that need them skip.
set -uo pipefail

# package:binary pairs; a package counts as present when its binary is found on PATH or in /usr/sbin
DEPS="openssh-server:sshd rsync:rsync netcat-openbsd:nc slurm-wlm:slurmctld munge:munged"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=""
for dep in $DEPS; do
    have "${dep#*:}" || missing="$missing ${dep%%:*}"
done
missing=${missing# }

if [ -z "$missing" ]; then
    echo "system_deps: all present (sshd rsync nc slurmctld munged), nothing to install"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "system_deps: skipped, not root (missing: $missing; the cluster tests that need them will skip)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system_deps: skipped, no apt-get here (missing: $missing; the cluster tests that need them will skip)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
: > /tmp/system_deps.log
apt_install() { apt-get install -y -q --no-install-recommends $missing >>/tmp/system_deps.log 2>&1; }
echo "system_deps: installing $missing"
if apt_install || { apt-get update -q >>/tmp/system_deps.log 2>&1 && apt_install; }; then
    echo "system_deps: installed $missing"
else
    echo "system_deps: WARNING: apt-get could not install $missing (see /tmp/system_deps.log);" \
         "the cluster tests that need them will skip"
fi
exit 0
