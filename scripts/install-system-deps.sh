#!/bin/sh
# Installs the Debian packages the tests and benchmarks use, if any is missing:
# real iSCSI clients (libiscsi-bin, qemu-img with iscsi://), tgt to compare against,
# iproute2 for the network-namespace rig and nftables for packet-loss tests.
set -eu
PACKAGES="libiscsi-bin qemu-utils qemu-block-extra tgt nftables iproute2 procps"
missing=""
for pkg in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing:$missing"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
