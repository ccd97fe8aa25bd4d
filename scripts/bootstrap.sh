#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 machine (root, no systemd):
# Debian packages for the servers, Consul, the project's venv.
# Every step checks first and does nothing when its work is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { printf '[bootstrap] %s\n' "$*" >&2; }

# --- Debian packages -------------------------------------------------------
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if ((${#need[@]})); then
    log "installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- Consul (see ../shared/vendor/README.md) --------------------------------
"$ROOT/scripts/install-consul.sh"

# --- The venv ---------------------------------------------------------------
stamp=.venv/.installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    python3 -m venv .venv
fi
if [[ ! -f $stamp ]]; then
    log "installing the project and its dev extras into .venv"
    # setuptools/wheel in the venv: the rollout test builds the project's wheel without build isolation
    .venv/bin/python -m pip install -q --upgrade pip 'setuptools>=77' wheel >/dev/null
    if ! .venv/bin/python -m pip install -q -e '.[dev]' >.venv/pip-install.log 2>&1; then
        grep -v '^WARNING: Location' .venv/pip-install.log >&2
        log "pip install failed (full log: .venv/pip-install.log)"
        exit 1
    fi
    rm -f .venv/.installed-*
    touch "$stamp"
fi
log "ready: .venv, etcd $(etcd --version | head -1 | awk '{print $3}'), consul $("$ROOT/scripts/install-consul.sh" --print-path)"
