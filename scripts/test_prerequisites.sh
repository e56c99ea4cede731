#!/usr/bin/env bash
# Make sure every tier of `make test` can run: the tools the real-process tiers need (a C++
# toolchain and cmake to build llama-server, Debian's Chromium and its driver for the dashboard's
# browser tier, systemd-analyze for the unit file's check).
#
# Usage: scripts/test_prerequisites.sh
#
# What is missing is installed with apt-get when this runs as root (or with passwordless sudo) on
# a Debian-like system; otherwise it stops with the one command that installs it. It never lets a
# tier be skipped quietly: `make test` runs it first, and stops when it fails.

set -euo pipefail

log() { printf 'test_prerequisites: %s\n' "$*" >&2; }

# command -> Debian package
declare -A wanted=(
    [cmake]=cmake
    [g++]=g++
    [make]=make
    [chromium]=chromium
    [chromedriver]=chromium-driver
    [systemd-analyze]=systemd
)

missing=()
for tool in "${!wanted[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${wanted[$tool]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

# Sorted, for a stable message.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
install="apt-get install -y ${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
    log "missing: ${missing[*]} (and no apt-get here): install them, then run make test again"
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    log "missing: ${missing[*]}. Run: sudo $install   then make test again"
    exit 1
fi
log "installing ${missing[*]} (once)"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq >&2
"${sudo[@]}" apt-get install -y -qq "${missing[@]}" >&2
