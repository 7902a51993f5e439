#!/usr/bin/env bash
# `make test-vagrant`: the multi-VM suite from scratch, with per-phase timings.
#
#   apt -> daemons -> box (cached) -> wheelhouse -> up -> provision -> pytest tests/vagrant
#   -> teardown (always, via trap: VMs, volumes, networks, pool, VAGRANT_HOME, run dir)
#
# Environment: NPV_APT_PACKAGES (from the Makefile), NPV_PYTEST_ARGS, NPV_KEEP=1 (keep the
# cluster for debugging; tear it down later with `scripts/vagrant/libvirt.sh teardown PREFIX`),
# NPV_CA_LIFETIME (CA service certificate lifetime, default 90s), NPV_NODE_LIFETIME (bootstrap
# node certificates, default 180s: they expire mid-suite, so the agents must renew them).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)

id=$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')
export NPV_PREFIX="pv-$id-"
run="$repo/.vagrant.d/run-$id"
export VAGRANT_HOME="$run/home"
export VAGRANT_DOTFILE_PATH="$run/dot"
export VAGRANT_DEFAULT_PROVIDER=libvirt
export VAGRANT_CHECKPOINT_DISABLE=1
export VAGRANT_BOX_UPDATE_CHECK_DISABLE=1
export LIBVIRT_DEFAULT_URI=qemu:///system
export NPV_CA_LIFETIME=${NPV_CA_LIFETIME:-90s}
export NPV_NODE_LIFETIME=${NPV_NODE_LIFETIME:-180s}
cache="$repo/.vagrant.d/box-cache"
ssh_cfg="$run/ssh_config"
logs="$repo/.vagrant.d/logs"
started_daemons=""
timings=()
suite_start=$(date +%s)

phase() {  # NAME COMMAND...
  local name=$1 t0 rc=0
  shift
  echo "==> [$name] $(date +%H:%M:%S)"
  t0=$(date +%s)
  "$@" || rc=$?
  timings+=("$(printf '%-11s %4d s%s' "$name" $(( $(date +%s) - t0 )) "$([ $rc = 0 ] || echo "  FAILED ($rc)")")")
  return $rc
}

teardown() {
  set +e
  if [ "${NPV_KEEP:-}" = 1 ]; then
    echo "==> NPV_KEEP=1: cluster kept (prefix $NPV_PREFIX, VAGRANT_HOME=$VAGRANT_HOME," \
      "VAGRANT_DOTFILE_PATH=$VAGRANT_DOTFILE_PATH, ssh -F $ssh_cfg node1)"
    return 0
  fi
  # virsh directly: `vagrant destroy` under TCG tries a graceful halt first and is slow.
  scripts/vagrant/libvirt.sh teardown "$NPV_PREFIX"
  for cm in /tmp/"$NPV_PREFIX"cm-*; do
    [ -S "$cm" ] && ssh -o ControlPath="$cm" -O exit x >/dev/null 2>&1
  done
  rm -rf "$run"
  rmdir "$repo/.vagrant.d" 2>/dev/null  # only if empty (the box cache stays)
  for pid in $started_daemons; do kill "$pid" 2>/dev/null; done
  # Wait until they are gone: a run queued behind this one (flock) would otherwise find a
  # dying libvirtd, not start its own, and fail to connect.
  for pid in $started_daemons; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  done
  left=$(virsh list --all --name 2>/dev/null | grep -c "^$NPV_PREFIX")
  [ "$left" = 0 ] || echo "WARNING: $left domain(s) $NPV_PREFIX* left behind" >&2
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  phase teardown teardown || true
  echo "==> timings (prefix $NPV_PREFIX)"
  printf '    %s\n' "${timings[@]}"
  printf '    %-11s %4d s\n' total $(( $(date +%s) - suite_start ))
  if [ $rc = 0 ]; then echo "==> test-vagrant: PASSED"; else echo "==> test-vagrant: FAILED ($rc)"; fi
  exit $rc
}
trap on_exit EXIT
trap 'exit 130' INT TERM

do_apt() {
  # shellcheck disable=SC2086
  scripts/ensure-apt.sh ${NPV_APT_PACKAGES:?set by the Makefile}
}

do_daemons() {
  started_daemons=$(scripts/vagrant/libvirt.sh daemons | tr '\n' ' ')
  [ -z "$started_daemons" ] || echo "    started libvirt daemons: $started_daemons"
  mkdir -p "$run" "$logs"
  scripts/vagrant/libvirt.sh up "$NPV_PREFIX" "$run/pool"
}

do_box() {
  local box hash
  box=$(scripts/vagrant/build-box.sh "$cache")
  hash=$(basename "$box" .box)
  export NPV_BOX="nodeproxy/${hash#nodeproxy-}"
  echo "    box $box ($(du -h "$box" | cut -f1))"
  vagrant box add -f --name "$NPV_BOX" "$box" >/dev/null
}

do_wheels() {
  # pip runs HERE, not in the guests (6-7x slower: ~170 s per VM measured): the wheelhouse is
  # installed with --no-index into a staging root under the guests' final prefix
  # /opt/nodeproxy/venv, byte-compiled for that path, and shipped as a tar.  Host and guests
  # are both Debian 12 with /usr/bin/python3 3.11, so the wheels and .pyc files match.
  local wh="$repo/.vagrant.d/wheelhouse" stage="$run/stage" venv=/opt/nodeproxy/venv f
  mkdir -p "$wh" "$run/bundle"
  rm -f "$wh"/nodeproxy-*.whl
  .venv/bin/pip wheel -q --find-links "$wh" -w "$wh" . 2>&1 | grep -v 'is ignored: it is neither' || true
  ls "$wh"/nodeproxy-*.whl >/dev/null
  .venv/bin/pip install -q --ignore-installed --no-index --find-links "$wh" --root "$stage" \
    --prefix "$venv" --no-compile --no-warn-script-location nodeproxy
  [ -d "$stage$venv/lib/python3.11/site-packages/nodeproxy" ]
  for f in "$stage$venv"/bin/*; do
    sed -i "1s|^#!.*python.*|#!$venv/bin/python3|" "$f"
  done
  /usr/bin/python3 -m compileall -q -j0 -s "$stage" -p / "$stage$venv/lib" >/dev/null
  tar -C "$stage$venv" -cf "$run/bundle/venv.tar" .
  rm -rf "$stage"
  cp -r scripts/vagrant/guest "$run/bundle/guest"
  if [ -f systemd/nodeproxy.service ] && [ -f systemd/nodeproxy-ca.service ]; then
    cp -r systemd "$run/bundle/systemd"
  else
    echo "    systemd/ units not in the repository: provisioning generates equivalents"
  fi
  echo "    $(ls "$wh" | wc -l) wheels -> venv.tar; bundle $(du -sh "$run/bundle" | cut -f1)"
}

vup() {  # MACHINE: vagrant up with the progress lines on the console, full log kept
  timeout 900 vagrant up --no-provision "$1" 2>&1 | tee -a "$logs/vagrant-up.log" | stdbuf -oL tr '\r' '\n' \
    | grep --line-buffered -vE 'Progress|^\s*$| -- |No version detected|local metadata|boxes/format'
}

do_up() {
  # One vagrant process per machine: vagrant-libvirt 0.11 hangs after "Creating domain" when
  # one process brings several machines up in parallel (measured here, twice).  cp goes first
  # and uploads the box volume; node1 and node2 then boot concurrently.
  : > "$logs/vagrant-up.log"
  vup cp
  vup node1 &
  local p1=$!
  vup node2 &
  local p2=$! rc=0
  wait $p1 || rc=$?
  wait $p2 || rc=$?
  [ $rc = 0 ] || return $rc
  [ "$(vagrant status --machine-readable | grep -c ',state,running')" = 3 ] || {
    vagrant status
    return 1
  }
  {
    printf 'Host *\n  ControlMaster auto\n  ControlPath /tmp/%scm-%%h\n  ControlPersist 900\n' \
      "$NPV_PREFIX"
    printf '  ServerAliveInterval 10\n  ConnectTimeout 30\n\n'
    vagrant ssh-config
  } > "$ssh_cfg"
}

do_provision() {
  scripts/vagrant/provision.sh "$ssh_cfg" "$run/bundle"
}

do_pytest() {
  # shellcheck disable=SC2086
  NPV_SSH_CONFIG="$ssh_cfg" .venv/bin/pytest tests/vagrant -v -p no:cacheprovider \
    ${NPV_PYTEST_ARGS:-}
}

phase apt do_apt
phase daemons do_daemons
phase box do_box
phase wheelhouse do_wheels
phase up do_up
phase provision do_provision
phase pytest do_pytest
