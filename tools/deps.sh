#!/bin/sh
# Installs the Debian packages moelab needs, only those missing. chromium is
# for the test that renders the HTML routing report headless.
set -e
PKGS="luajit libluajit-5.1-dev lua-busted libopenblas-dev libcairo2-dev libpango1.0-dev libcjson-dev
libpcre2-dev libutf8proc-dev libedit-dev libopenmpi-dev openmpi-bin poppler-utils pkg-config make gcc
chromium"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then echo "deps: all packages present"; exit 0; fi
echo "deps: installing$missing"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
