#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 machine (root, no systemd):
# Debian packages for the servers (etcd, Docker, Ceph), Consul, the project's venv.
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
# Prometheus 2.42 with promtool: the rules' unit tests and tests/integration/observability.
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
# Ceph (Pacific from Debian 12) for the CephFS test cluster (testbed/ceph.py).
for d in ceph-mon ceph-osd ceph-mgr ceph-mds ceph-fuse; do
    command -v "$d" >/dev/null 2>&1 || need+=("$d")
done
command -v ceph-authtool >/dev/null 2>&1 || need+=(ceph-common)
for p in python3-rados python3-cephfs; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *'ok installed' ]] || need+=("$p")
done
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
# --- Debian's Ceph bindings in the venv --------------------------------------
# rados/cephfs are Cython extensions built for Debian's python3.11; the venv's interpreter has
# the same ABI. Only these two modules are exposed (symlinks + one .pth), not dist-packages.
ceph_dir=$ROOT/.venv/ceph-bindings
ext=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! .venv/bin/python -c 'import rados, cephfs' >/dev/null 2>&1; then
    log "linking Debian's rados/cephfs bindings into .venv ($ceph_dir)"
    mkdir -p "$ceph_dir"
    for m in rados cephfs; do
        src=/usr/lib/python3/dist-packages/$m$ext
        [[ -f $src ]] || { log "missing $src (python3-$m for this Python ABI)"; exit 1; }
        ln -sfn "$src" "$ceph_dir/$m$ext"
    done
    printf '%s\n' "$ceph_dir" >"$site/debian-ceph-bindings.pth"
    .venv/bin/python -c 'import rados, cephfs' || { log "import rados/cephfs failed"; exit 1; }
fi
log "ready: .venv, etcd $(etcd --version | head -1 | awk '{print $3}'), consul $("$ROOT/scripts/install-consul.sh" --print-path), ceph $(ceph-mon --version | awk '{print $3}'), prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}')"
