#!/usr/bin/env bash
# System packages the workbench uses offline: Debian's Fashion-MNIST files and chromium (the dashboard's browser
# test and screenshots). Installs what is missing when run as root on Debian; otherwise says what to install.
set -euo pipefail
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
else
    echo "note: optional system packages missing: ${missing[*]} (sudo apt-get install ${missing[*]});" \
         "Fashion-MNIST and the browser test are skipped without them" >&2
fi
