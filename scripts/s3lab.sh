#!/bin/bash
# s3lab.sh up|down DIR -- a throwaway S3 server for the off-site tests and the benchmark:
# Ceph (Debian's ceph-mon, ceph-osd, radosgw) as one monitor, one memstore OSD (data in RAM,
# MEMSTORE_BYTES, default 4 GiB) and one RADOS Gateway, all bound to 127.0.0.1 on free ports,
# everything (config, pids, logs, sockets) inside DIR. No systemd, no /etc/ceph, no auth between
# the daemons (cephx off: nothing listens beyond 127.0.0.1); S3 signatures are checked by RGW.
# `up` prints shell exports (S3_ENDPOINT, AWS_*) and writes them to DIR/s3.env; users LABKEY
# (owner of the buckets) and LABRO (a second user for permission tests) are created.
# `down` kills every daemon named in DIR/run/*.pid (TERM, then KILL) and removes DIR.
set -euo pipefail
CMD=${1:?usage: s3lab.sh up|down DIR}; D=${2:?usage: s3lab.sh up|down DIR}
alive() { local s; s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ "$s" != Z ]; }
down() {
  for n in rgw osd mon; do
    [ -f "$D/run/$n.pid" ] || continue
    p=$(cat "$D/run/$n.pid")
    kill -TERM "$p" 2>/dev/null || continue
    for _ in $(seq 250); do alive "$p" || break; sleep 0.02; done
    alive "$p" && kill -KILL "$p" 2>/dev/null || true
  done
  rm -rf "$D"
}
if [ "$CMD" = down ]; then down; exit 0; fi
[ "$CMD" = up ] || { echo "usage: s3lab.sh up|down DIR" >&2; exit 2; }
for prog in ceph-mon ceph-osd radosgw radosgw-admin monmaptool ceph curl uuidgen; do
  command -v "$prog" >/dev/null || { echo "s3lab: $prog not found (apt-get install ceph-mon ceph-osd ceph-common radosgw curl)" >&2; exit 1; }
done
fail() { echo "s3lab: $*; logs in $D/log" >&2; exit 1; }
waitfor() { local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do [ $SECONDS -lt $end ] || fail "timed out: $*"; sleep 0.1; done; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
start() { local n=$1; shift; "$@" </dev/null >>"$D/log/$n.out" 2>&1 & echo $! >"$D/run/$n.pid"; }
rm -rf "$D"; mkdir -p "$D"/{mon,osd,run,log,crash}
FSID=$(uuidgen); MP=$(port); RP=$(port)
cat >"$D/ceph.conf" <<CONF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MP
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
run dir = $D/run
admin socket = $D/run/\$cluster-\$name.asok
log file = $D/log/\$cluster-\$name.log
mon cluster log file = $D/log/\$cluster.log
crash dir = $D/crash
keyring = $D/keyring
mon data = $D/mon/\$cluster-\$id
osd data = $D/osd/\$cluster-\$id
rgw data = $D/rgw
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
mon data avail warn = 1
mon data avail crit = 1
mon warn on insecure global id reclaim allowed = false
paxos propose interval = 0.01
[osd]
osd objectstore = memstore
memstore device bytes = ${MEMSTORE_BYTES:-4294967296}
[client.rgw.lab]
rgw frontends = beast endpoint=127.0.0.1:$RP
rgw thread pool size = 64
CONF
export CEPH_ARGS="--cluster s3lab --conf $D/ceph.conf"
trap 'rc=$?; [ $rc = 0 ] || { echo "s3lab: up failed; cleaning up" >&2; down; }' EXIT
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MP]" "$D/monmap" >/dev/null
ceph-mon --mkfs -i a --monmap "$D/monmap" >>"$D/log/mkfs.out" 2>&1
start mon ceph-mon -i a -f
waitfor 30 timeout 10 ceph --connect-timeout 3 mon stat
U=$(uuidgen); ID=$(ceph osd new "$U"); mkdir -p "$D/osd/s3lab-$ID"
ceph-osd -i "$ID" --mkfs --osd-uuid "$U" >>"$D/log/mkfs.out" 2>&1
start osd ceph-osd -i "$ID" -f
start rgw radosgw -n client.rgw.lab -f
waitfor 120 curl -so /dev/null "http://127.0.0.1:$RP/"
radosgw-admin user create --uid=lab --display-name=lab --access-key=LABKEY --secret-key=LABSECRET >/dev/null
radosgw-admin user create --uid=labro --display-name=labro --access-key=LABRO --secret-key=LABROSECRET >/dev/null
printf 'export %s\n' "CEPH_ARGS='$CEPH_ARGS'" "S3_ENDPOINT=http://127.0.0.1:$RP" \
  AWS_ACCESS_KEY_ID=LABKEY AWS_SECRET_ACCESS_KEY=LABSECRET AWS_DEFAULT_REGION=us-east-1 | tee "$D/s3.env"
