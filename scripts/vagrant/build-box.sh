#!/usr/bin/env bash
# Build the Debian 12 (bookworm) Vagrant box for the libvirt provider, offline from Vagrant Cloud
# (only a Debian mirror is needed), and cache it by the content hash of this script.
#
#   scripts/vagrant/build-box.sh CACHE_DIR      -> prints the path of the cached .box
#
# Recipe (DESIGN §9): mmdebstrap minbase + kernel + systemd + sshd + python3; a `vagrant` user
# with passwordless sudo and Vagrant's insecure key; a raw disk with one ext4 partition made
# without 64bit/metadata_csum (syslinux cannot read them); extlinux + MBR; qcow2; a .box tar.
set -euo pipefail

cache_dir=${1:?usage: build-box.sh CACHE_DIR}
mkdir -p "$cache_dir"
hash=$(sha256sum "$0" | cut -c1-16)
box="$cache_dir/nodeproxy-bookworm-$hash.box"
if [ -s "$box" ]; then
  echo "$box"
  exit 0
fi

# Packages inside the guest.  python3-venv: the agent's venv; tcpdump: the wire capture test;
# iptables: capture rules; socat: handy for debugging pods.  eBPF mode (--redirect ebpf, one
# test module): python3-bpfcc (bcc), bpftool (cgroup attachment listings) and the headers of
# the guest's own kernel: linux-headers-amd64 comes from the same mirror snapshot as
# linux-image-amd64, so /lib/modules/$(uname -r)/build exists and bcc needs no merged tree.
PACKAGES=linux-image-amd64,initramfs-tools,systemd-sysv,udev,dbus,openssh-server,sudo,python3,\
python3-venv,iproute2,iptables,nftables,ifupdown,isc-dhcp-client,tcpdump,socat,procps,kmod,less,\
python3-bpfcc,bpftool,linux-headers-amd64
DISK_MB=3072
MIRROR=${NODEPROXY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keydir=$(ls -d /usr/share/rubygems-integration/all/gems/vagrant-*/keys | grep -v libvirt | head -1)

work=$(mktemp -d /var/tmp/pv-box.XXXXXX)
loopdev=""
cleanup() {
  set +e
  mountpoint -q "$work/mnt" && umount "$work/mnt"
  [ -n "$loopdev" ] && losetup -d "$loopdev"
  rm -rf "$work"
}
trap cleanup EXIT

echo "box: mmdebstrap bookworm minbase ($MIRROR)" >&2
mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
  --customize-hook='echo pv-box > "$1/etc/hostname"' \
  bookworm "$work/root" "$MIRROR" >&2

r="$work/root"
# vagrant user, passwordless sudo, insecure key
chroot "$r" useradd -m -s /bin/bash -G sudo vagrant
echo 'vagrant:vagrant' | chroot "$r" chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' > "$r/etc/sudoers.d/vagrant"
chmod 0440 "$r/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "$r/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$keydir/vagrant.pub" "$r/home/vagrant/.ssh/authorized_keys"
echo 'root:vagrant' | chroot "$r" chpasswd
# sshd: no DNS lookups (slow under emulation); host keys are generated at first boot.
echo 'UseDNS no' > "$r/etc/ssh/sshd_config.d/vagrant.conf"
rm -f "$r"/etc/ssh/ssh_host_*
cat > "$r/etc/systemd/system/ssh-keygen-once.service" <<'EOF'
[Unit]
Description=Generate SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
EOF
chroot "$r" systemctl enable ssh-keygen-once.service >/dev/null 2>&1
# network: eth0 DHCP (management); vagrant-libvirt configures eth1 itself.
cat > "$r/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback
source /etc/network/interfaces.d/*
allow-hotplug eth0
iface eth0 inet dhcp
EOF
echo 'UUID=ROOTUUID / ext4 errors=remount-ro 0 1' > "$r/etc/fstab"
# Faster boot under TCG: no timers, no apt daily jobs.
chroot "$r" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
  fstrim.timer >/dev/null 2>&1 || true
printf 'Storage=persistent\n' >> "$r/etc/systemd/journald.conf"
rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/*
# bcc compiles against the running kernel's headers: the image and the headers must match.
kver=$(cd "$r/lib/modules" && ls | sort -V | tail -1)
chroot "$r" test -d "/lib/modules/$kver/build/include" || {  # (build: an absolute symlink)
  echo "box: no kernel headers for $kver (bcc would not compile)" >&2
  exit 1
}

echo "box: disk image" >&2
raw="$work/box.raw"
truncate -s "${DISK_MB}M" "$raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$raw"
# No partition devices here (loop partscan yields no nodes without udev): a loop device over
# the partition's byte range instead.
part_off=$((2048 * 512))
loopdev=$(losetup --show -f -o "$part_off" --sizelimit $((DISK_MB * 1024 * 1024 - part_off)) "$raw")
mkfs.ext4 -q -O ^64bit,^metadata_csum -L root "$loopdev"
uuid=$(blkid -s UUID -o value "$loopdev")
sed -i "s/ROOTUUID/$uuid/" "$r/etc/fstab"
mkdir -p "$work/mnt"
mount "$loopdev" "$work/mnt"
tar -C "$r" --xattrs --xattrs-include='*' --numeric-owner -cf - . \
  | tar -C "$work/mnt" --xattrs --xattrs-include='*' --numeric-owner -xf -
kernel=$(cd "$work/mnt/boot" && ls vmlinuz-* | sort -V | tail -1)
initrd=$(cd "$work/mnt/boot" && ls initrd.img-* | sort -V | tail -1)
mkdir -p "$work/mnt/boot/extlinux"
cat > "$work/mnt/boot/extlinux/extlinux.conf" <<EOF
DEFAULT linux
TIMEOUT 0
PROMPT 0
LABEL linux
  LINUX /boot/$kernel
  INITRD /boot/$initrd
  APPEND root=UUID=$uuid ro console=ttyS0 net.ifnames=0 quiet
EOF
extlinux --install "$work/mnt/boot/extlinux" >/dev/null 2>&1
umount "$work/mnt"
losetup -d "$loopdev"
loopdev=""
# extlinux saw a device starting at sector 0: store the real partition start (2048) in the boot
# sector's "hidden sectors" field, then add the syslinux MBR.
printf '\x00\x08\x00\x00' | dd of="$raw" bs=1 seek=$((part_off + 0x1C)) conv=notrunc status=none
dd if=/usr/lib/EXTLINUX/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none

echo "box: qcow2 + box tar" >&2
qemu-img convert -O qcow2 "$raw" "$work/box.img"
rm -f "$raw"
virtual_gb=$(( (DISK_MB + 1023) / 1024 ))
printf '{"provider":"libvirt","format":"qcow2","virtual_size":%d}\n' "$virtual_gb" > "$work/metadata.json"
cat > "$work/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "qemu"
  end
end
EOF
tar -C "$work" -cf "$box.tmp" box.img metadata.json Vagrantfile
mv "$box.tmp" "$box"
# Keep only the current box in the cache.
find "$cache_dir" -maxdepth 1 -name 'nodeproxy-bookworm-*.box' ! -name "$(basename "$box")" -delete
echo "$box"
