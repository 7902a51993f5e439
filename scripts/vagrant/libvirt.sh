#!/usr/bin/env bash
# libvirt plumbing for the Vagrant suite (DESIGN §9).
#
#   libvirt.sh daemons           start virtlogd/libvirtd when no systemd runs them (idempotent);
#                                prints the pids it started, one per line, on stdout
#   libvirt.sh up PREFIX DIR     (re)define + start the storage pool (in DIR), the NAT management
#                                network and the isolated private network named after PREFIX
#   libvirt.sh teardown PREFIX   remove every domain, volume, network and pool named PREFIX*
#
# `vagrant destroy` deletes networks it thinks it created, so `up` runs before every `vagrant up`.
# Addresses are fixed (one suite at a time per host); see the Vagrantfile for the same values.
set -euo pipefail
export LIBVIRT_DEFAULT_URI=qemu:///system

MGMT_NET=${NPV_MGMT_CIDR_PREFIX:-192.168.187}
PRIV_NET=${NPV_PRIV_CIDR_PREFIX:-172.30.187}

die() { echo "libvirt.sh: $*" >&2; exit 1; }

daemons() {
  if ! pgrep -x virtlogd >/dev/null; then
    virtlogd -d
    pgrep -nx virtlogd
  fi
  if ! pgrep -x libvirtd >/dev/null; then
    # /dev/kvm exists but only root may open it (PVM, unusable for our guests anyway): libvirt
    # probes qemu WITH KVM, then finds KVM "not available now" for the qemu user and re-probes
    # on every domain define (~33 s each, measured).  libvirtd (and its qemus) get a private
    # mount namespace where /dev/kvm is /dev/null: KVM is consistently absent, the cache holds.
    if [ -e /dev/kvm ]; then
      unshare -m --propagation slave sh -c 'mount --bind /dev/null /dev/kvm && exec libvirtd -d'
    else
      libvirtd -d
    fi
    pgrep -nx libvirtd
  fi
  for _ in $(seq 1 50); do
    virsh -q version >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "libvirtd did not answer on qemu:///system (see /var/log/libvirt/libvirtd.log)"
}

short() {  # bridge names are limited to 15 characters: pv-ab12- -> pvab12
  echo "$1" | tr -d -- '-_' | cut -c1-10
}

net_define() {  # NAME XML
  if virsh net-info "$1" >/dev/null 2>&1; then
    virsh net-destroy "$1" >/dev/null 2>&1 || true
    virsh net-undefine "$1" >/dev/null
  fi
  virsh net-define /dev/stdin <<<"$2" >/dev/null
  virsh net-start "$1" >/dev/null
}

up() {
  local prefix=$1 dir=$2 s
  s=$(short "$prefix")
  mkdir -p "$dir"
  if virsh pool-info "${prefix}pool" >/dev/null 2>&1; then
    virsh pool-destroy "${prefix}pool" >/dev/null 2>&1 || true
    virsh pool-undefine "${prefix}pool" >/dev/null
  fi
  virsh pool-define-as "${prefix}pool" dir --target "$dir" >/dev/null
  virsh pool-start "${prefix}pool" >/dev/null
  net_define "${prefix}mgmt" "<network>
  <name>${prefix}mgmt</name>
  <forward mode='nat'/>
  <bridge name='${s}m' stp='off' delay='0'/>
  <ip address='${MGMT_NET}.1' netmask='255.255.255.0'>
    <dhcp><range start='${MGMT_NET}.100' end='${MGMT_NET}.200'/></dhcp>
  </ip>
</network>"
  net_define "${prefix}priv" "<network>
  <name>${prefix}priv</name>
  <bridge name='${s}p' stp='off' delay='0'/>
  <ip address='${PRIV_NET}.1' netmask='255.255.255.0'/>
</network>"
}

teardown() {
  local prefix=$1 d n p v
  [ -n "$prefix" ] || die "teardown needs a non-empty prefix"
  for d in $(virsh list --all --name | grep "^${prefix}" || true); do
    virsh destroy "$d" >/dev/null 2>&1 || true
    virsh undefine "$d" --remove-all-storage >/dev/null 2>&1 \
      || virsh undefine "$d" >/dev/null 2>&1 || true
  done
  for n in $(virsh net-list --all --name | grep "^${prefix}" || true); do
    virsh net-destroy "$n" >/dev/null 2>&1 || true
    virsh net-undefine "$n" >/dev/null 2>&1 || true
  done
  for p in $(virsh pool-list --all --name | grep "^${prefix}" || true); do
    virsh pool-start "$p" >/dev/null 2>&1 || true
    for v in $(virsh vol-list "$p" 2>/dev/null | awk 'NR>2 && $1 {print $1}'); do
      virsh vol-delete "$v" --pool "$p" >/dev/null 2>&1 || true
    done
    virsh pool-destroy "$p" >/dev/null 2>&1 || true
    virsh pool-undefine "$p" >/dev/null 2>&1 || true
  done
}

case "${1:-}" in
  daemons) daemons ;;
  up) up "${2:?prefix}" "${3:?pool dir}" ;;
  teardown) teardown "${2:?prefix}" ;;
  *) die "usage: libvirt.sh daemons | up PREFIX DIR | teardown PREFIX" ;;
esac
