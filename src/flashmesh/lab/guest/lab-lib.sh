# Shell helpers for lab scenarios, sourced inside a VM: nvmet through configfs, the host
# side of NVMe-oF, and verified I/O. The product does this in Python (flashmesh.dataplane);
# these exist to prove the kernel side on its own.
NVMET=/sys/kernel/config/nvmet

# nvmet_subsystem NQN DEVICE [ALLOW_ANY=1]: a subsystem whose namespace 1 is DEVICE.
nvmet_subsystem() {
  local nqn=$1 dev=$2 any=${3:-1} s=$NVMET/subsystems/$1
  modprobe nvmet
  mkdir -p "$s/namespaces/1"
  echo "$any" > "$s/attr_allow_any_host"
  if [ "$(cat "$s/namespaces/1/enable")" != 1 ]; then  # attributes change only while disabled
    echo "$dev" > "$s/namespaces/1/device_path"
    echo 1 > "$s/namespaces/1/enable"
  fi
}

# nvmet_port ID TRTYPE ADDR SVCID NQN: a port (created once) that exposes the subsystem.
nvmet_port() {
  local id=$1 tr=$2 addr=$3 svc=$4 nqn=$5 p=$NVMET/ports/$1
  modprobe "nvmet-$tr"
  if [ ! -d "$p" ]; then
    mkdir "$p"
    echo "$tr" > "$p/addr_trtype"; echo ipv4 > "$p/addr_adrfam"
    echo "$addr" > "$p/addr_traddr"; echo "$svc" > "$p/addr_trsvcid"
  fi
  # configfs links cannot be replaced (ln -f): link once.
  [ -L "$p/subsystems/$nqn" ] || ln -s "$NVMET/subsystems/$nqn" "$p/subsystems/$nqn"
}

# nvmet_allow_host NQN HOSTNQN [DHCHAP_KEY]: only this host may connect (with this key).
nvmet_allow_host() {
  local nqn=$1 host=$2 key=${3:-} h=$NVMET/hosts/$2
  mkdir -p "$h"
  [ -n "$key" ] && echo "$key" > "$h/dhchap_key"
  [ -L "$NVMET/subsystems/$nqn/allowed_hosts/$host" ] \
    || ln -s "$h" "$NVMET/subsystems/$nqn/allowed_hosts/$host"
}

# rxe_up NETDEV: a soft-RoCE device over a network interface.
rxe_up() {
  modprobe rdma_rxe; modprobe ib_uverbs
  [ -e /sys/class/infiniband/rxe0 ] || rdma link add rxe0 type rxe netdev "$1"
}

# nvme_device NQN [TIMEOUT_S]: the block device of the subsystem, once it appears.
nvme_device() {
  local nqn=$1 deadline=$(( $(date +%s) + ${2:-30} ))
  while [ "$(date +%s)" -le $deadline ]; do
    for s in /sys/class/nvme-subsystem/nvme-subsys*; do
      [ "$(cat "$s/subsysnqn" 2>/dev/null)" = "$nqn" ] || continue
      for d in "$s"/nvme*n*; do
        local b=${d##*/}
        [[ $b =~ ^nvme[0-9]+n[0-9]+$ ]] && [ -b "/dev/$b" ] && { echo "/dev/$b"; return 0; }
      done
    done
    sleep 0.2
  done
  echo "no block device for $nqn" >&2; return 1
}

# fio_verify DEVICE SIZE [FIO_ARGS...]: write SIZE with checksums, read it back and check
# every block; prints fio's JSON.
fio_verify() {
  local dev=$1 size=$2; shift 2
  fio --name=verify --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite --bs=64k \
      --iodepth=8 --size="$size" --verify=crc32c --verify_fatal=1 --output-format=json "$@"
}

# drive_by_serial SERIAL: the /dev path of the local NVMe drive with this serial.
drive_by_serial() {
  local c
  for c in /sys/class/nvme/nvme*; do
    if [ "$(tr -d ' ' < "$c/serial")" = "$1" ] && [ "$(cat "$c/transport")" = pcie ]; then
      echo "/dev/${c##*/}n1"; return 0
    fi
  done
  echo "no local drive with serial $1" >&2; return 1
}

# lvm_volume DRIVE NAME SIZE: logical volume NAME in volume group fmlab on DRIVE (both made
# once, idempotently); prints its device path.
lvm_volume() {
  local drive=$1 name=$2 size=$3
  if ! vgs fmlab >/dev/null 2>&1; then
    pvcreate -q -y "$drive" >/dev/null && vgcreate -q fmlab "$drive" >/dev/null
  fi
  vgchange -q -ay fmlab >/dev/null
  lvs fmlab/"$name" >/dev/null 2>&1 || lvcreate -q -y -n "$name" -L "$size" fmlab >/dev/null
  echo "/dev/mapper/fmlab-${name//-/--}"  # device-mapper doubles the dashes in names
}

# path_states NQN: one line per path to the subsystem, "<target address>=<state>", sorted.
path_states() {
  local s c
  for s in /sys/class/nvme-subsystem/nvme-subsys*; do
    [ "$(cat "$s/subsysnqn" 2>/dev/null)" = "$1" ] || continue
    for c in "$s"/nvme*; do
      [ -e "$c/address" ] || continue
      echo "$(sed -n 's/.*traddr=\([^,]*\).*/\1/p' "$c/address")=$(cat "$c/state")"
    done
  done | sort
}

# nvmet_clear PREFIX: every subsystem whose NQN starts with PREFIX unexported and
# removed, with the ports that only they used; FlashMesh's own (another prefix) untouched.
# Scenarios call it when they end, so an address they bound is free for the next one.
nvmet_clear() {
  local prefix=$1 p l s
  [ -d $NVMET ] || return 0
  for p in $NVMET/ports/*; do
    [ -d "$p" ] || continue
    local ours=0
    for l in "$p"/subsystems/"$prefix"*; do [ -L "$l" ] && { rm "$l"; ours=1; }; done
    [ $ours = 1 ] && [ -z "$(ls "$p/subsystems")" ] && rmdir "$p"
  done
  for s in $NVMET/subsystems/"$prefix"*; do
    [ -d "$s" ] || continue
    for l in "$s"/allowed_hosts/*; do [ -L "$l" ] && rm "$l"; done
    [ -d "$s/namespaces/1" ] && { echo 0 > "$s/namespaces/1/enable"; rmdir "$s/namespaces/1"; }
    rmdir "$s"
  done
  return 0
}
