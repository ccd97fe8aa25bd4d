#!/usr/bin/env bash
# Puts a consul binary at .tools/bin/consul (or finds one on PATH), trying in order:
#   1. a consul already on PATH;
#   2. Debian bullseye's package through apt, with a temporary sources list whose
#      mirror URI is read from this machine's own apt sources;
#   3. the vendored .deb in ../shared/vendor, checked against SHA256SUMS.
# With --print-path it only prints the binary it would use.
# Environment: CONSUL_TOOLS_DIR (default .tools), CONSUL_VENDOR_DIR (default ../shared/vendor),
# CONSUL_SKIP_PATH=1 / CONSUL_SKIP_APT=1 to exercise the later fallbacks (tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=${CONSUL_TOOLS_DIR:-$ROOT/.tools}
DEST=$TOOLS/bin/consul
VENDOR=${CONSUL_VENDOR_DIR:-$ROOT/../shared/vendor}
log() { printf '[install-consul] %s\n' "$*" >&2; }

found() {
    if [[ ${CONSUL_SKIP_PATH:-0} != 1 ]] && command -v consul >/dev/null 2>&1; then
        command -v consul; return 0
    fi
    if [[ -x $DEST ]]; then echo "$DEST"; return 0; fi
    return 1
}
if [[ ${1:-} == --print-path ]]; then found || { echo "consul not installed" >&2; exit 1; }; exit 0; fi
if path=$(found); then exit 0; fi

mkdir -p "$TOOLS/bin"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

extract() {  # extract usr/bin/consul from a .deb into $DEST
    dpkg-deb -x "$1" "$tmp/x"
    install -m 0755 "$tmp/x/usr/bin/consul" "$DEST"
    log "installed $("$DEST" version | head -1) at $DEST"
}

mirror_uri() {  # the machine's own Debian mirror, never a name written here
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri=$(awk '/^URIs:/ {for (i=2;i<=NF;i++) if ($i !~ /security/) {print $i; exit}}' \
              /etc/apt/sources.list.d/*.sources | head -1)
    fi
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1=="deb" && $0 !~ /security/ {for (i=2;i<=NF;i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' \
              /etc/apt/sources.list | head -1)
    fi
    [[ -n $uri ]] && echo "$uri"
}

if [[ ${CONSUL_SKIP_APT:-0} != 1 ]] && uri=$(mirror_uri); then
    log "trying Debian bullseye's consul package from the machine's mirror"
    mkdir -p "$tmp/lists/partial" "$tmp/parts" "$tmp/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri bullseye main" >"$tmp/bullseye.list"
    opts=(-o "Dir::Etc::sourcelist=$tmp/bullseye.list" -o "Dir::Etc::sourceparts=$tmp/parts"
          -o "Dir::State::lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o "APT::Get::List-Cleanup=0")
    if timeout 300 apt-get "${opts[@]}" update -qq >/dev/null 2>&1 \
        && (cd "$tmp" && timeout 300 apt-get "${opts[@]}" download consul >/dev/null 2>&1); then
        deb=$(ls "$tmp"/consul_*.deb 2>/dev/null | head -1 || true)
        if [[ -n $deb ]]; then extract "$deb"; exit 0; fi
    fi
    log "bullseye package not available through apt; falling back to the vendored .deb"
fi

deb=$(ls "$VENDOR"/consul_*.deb 2>/dev/null | head -1 || true)
[[ -n $deb ]] || { log "no consul: not on PATH, not from apt, and no .deb in $VENDOR"; exit 1; }
sum_line=$(awk -v f="$(basename "$deb")" '$2 == f || $2 == "*" f' "$VENDOR/SHA256SUMS")
[[ -n $sum_line ]] || { log "no checksum for $(basename "$deb") in $VENDOR/SHA256SUMS"; exit 1; }
(cd "$VENDOR" && echo "$sum_line" | sha256sum -c --quiet - >/dev/null 2>&1) \
    || { log "checksum mismatch for $deb: refusing to install it"; exit 1; }
extract "$deb"
