#!/bin/sh
# Installs the Debian packages the tests and benchmarks use, if any is missing:
# real iSCSI clients (libiscsi-bin, qemu-img with iscsi://), tgt to compare against,
# iproute2 for the network-namespace rig, nftables for packet-loss tests, systemd for checking
# the service unit (systemd-analyze); liburing-dev for the C io_uring sender the benchmark builds
# as its anchor.
set -eu
PACKAGES="libiscsi-bin qemu-utils qemu-block-extra tgt nftables iproute2 procps systemd liburing-dev"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

installed_version() {
    dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | sed -n 's/^install ok installed //p'
}

missing=""
for pkg in $PACKAGES; do
    [ -n "$(installed_version "$pkg")" ] || missing="$missing $pkg"
done
# qemu-img speaks iscsi:// only through qemu-block-extra of the very same version. A machine may
# come with a newer qemu-utils than the archive's qemu-block-extra; installing the module alone
# would then make apt remove qemu-img. So the two are installed together, at one version.
if [ "$(installed_version qemu-utils)" != "$(installed_version qemu-block-extra)" ]; then
    missing="$missing qemu-utils qemu-block-extra"
fi
[ -z "$missing" ] && exit 0

echo "installing:$missing"
$SUDO apt-get update -q
qemu_version=$(apt-cache policy qemu-block-extra | awk '/Candidate:/ {print $2}')
pinned=""
for pkg in $(echo "$missing" | tr ' ' '\n' | sort -u); do
    case "$pkg" in
    qemu-utils | qemu-block-extra) pinned="$pinned $pkg=$qemu_version" ;;
    *) pinned="$pinned $pkg" ;;
    esac
done
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    --allow-downgrades $pinned
# Fail here, not in a skipped test, if qemu-img still cannot reach iSCSI.
qemu-img --help | grep -qw iscsi || {
    echo "qemu-img is installed without its iscsi:// driver (qemu-block-extra)" >&2
    exit 1
}
