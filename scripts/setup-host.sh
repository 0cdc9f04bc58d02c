#!/bin/bash
# Make this Debian 12 machine a libvirt/QEMU host for virtbackup and build the virtualenv.
# Idempotent: safe to run again; installs only what is missing, starts daemons only if not running.
# Facts behind the settings: libvirtd here runs as root with no security driver, cgroups or
# namespaces (the sandbox has none of them); see README "Host setup".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VIRTBACKUP_VENV:-$ROOT/.venv}"
# systemd: only for `systemd-analyze verify` of contrib/systemd in the tests; installing the
# package does not make systemd PID 1 or start anything (libvirt's packages pull it in anyway).
PACKAGES=(libvirt-daemon-driver-qemu libvirt-daemon libvirt-clients qemu-system-x86 qemu-utils
          libvirt-dev pkg-config python3-venv systemd)
# Installed without recommends (libguestfs-tools would pull in hundreds of MB otherwise):
# - the real test guest: a Debian kernel, busybox and the QEMU guest agent (docs/testing.md, "The test guest");
# - bindings that exist only as Debian packages: python3-guestfs (files), python3-libnbd (pull mode);
#   b3sum checks the recorded BLAKE3 image hashes by hand (and in the tests);
#   the virtualenv is made from Debian's /usr/bin/python3 with --system-site-packages to see them;
# - openssh-server: only its sshd binary, for the remote-URI tests (qemu+ssh to 127.0.0.1), which
#   start a private sshd with a throwaway key and config and stop it again. The package's own
#   service is never started by this script.
# - a throwaway Ceph cluster with a RADOS Gateway (S3) for the off-site tests: the test suite
#   starts it on 127.0.0.1 (memstore OSD, no auth inside) and stops it again;
# - Cockpit and a headless Chromium with its WebDriver for the Backups page's browser tests: the
#   suite starts a private cockpit-ws on 127.0.0.1; the packages' own services are not started;
#   sudo: Cockpit's administrative access (the tests' login user is in group sudo).
EXTRA_PACKAGES=(linux-image-amd64 busybox-static qemu-guest-agent e2fsprogs cpio
                libguestfs-tools python3-guestfs python3-libnbd openssh-server b3sum
                ceph-mon ceph-osd ceph-common radosgw
                cockpit-ws cockpit-bridge cockpit-system chromium chromium-driver sudo)

log() { echo "setup-host: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "setup-host: must run as root (installs packages, starts libvirtd)" >&2
    exit 2
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
missing_extra=()
for p in "${EXTRA_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_extra+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ ${#missing_extra[@]} -gt 0 ]; then
    apt-get update -q >/dev/null
fi
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
if [ ${#missing_extra[@]} -gt 0 ]; then
    log "installing ${missing_extra[*]} (no recommends)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing_extra[@]}" >/dev/null
fi

getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt/qemu /etc/libvirt

# NBD over TLS for remote pull backups (docs/guide.md "Remote hosts"): a throwaway CA made here,
# a server certificate for 127.0.0.1/localhost that libvirt gives QEMU's NBD server
# (backup_tls_x509_cert_dir, client certificates required), and a client certificate for
# virtbackup in $TLS_DIR/client. Test material for this machine only: never a production CA.
TLS_DIR=/etc/pki/virtbackup-test
if [ ! -s "$TLS_DIR/client/client-key.pem" ]; then
    log "making a throwaway CA and NBD TLS certificates in $TLS_DIR"
    rm -rf "$TLS_DIR"
    mkdir -p "$TLS_DIR/client"
    chmod 700 "$TLS_DIR" "$TLS_DIR/client"
    (
        cd "$TLS_DIR"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=virtbackup test CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
        for who in server client; do
            if [ "$who" = server ]; then
                ext="subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
            else
                ext="extendedKeyUsage=clientAuth"
            fi
            printf "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n$ext\n" > "$who.ext"
            openssl req -newkey rsa:2048 -nodes -subj "/CN=virtbackup test $who" \
                -keyout "$who-key.pem" -out "$who.csr" 2>/dev/null
            openssl x509 -req -in "$who.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 3650 \
                -extfile "$who.ext" -out "$who-cert.pem" 2>/dev/null
            rm -f "$who.csr" "$who.ext"
        done
        mv client-key.pem client-cert.pem client/
        cp ca-cert.pem client/
        chmod 644 ca-cert.pem client/ca-cert.pem server-cert.pem client/client-cert.pem
    )
fi

QEMU_CONF=/etc/libvirt/qemu.conf
want="# virtbackup-setup: sandbox settings, v2
user = \"root\"
group = \"root\"
security_driver = \"none\"
cgroup_controllers = [ ]
namespaces = [ ]
remember_owner = 0
backup_tls_x509_cert_dir = \"$TLS_DIR\"
backup_tls_x509_verify = 1"
if [ "$(cat "$QEMU_CONF" 2>/dev/null)" != "$want" ]; then
    log "writing $QEMU_CONF"
    if [ -f "$QEMU_CONF" ] && ! grep -q '^# virtbackup-setup' "$QEMU_CONF"; then
        cp "$QEMU_CONF" "$QEMU_CONF.orig-virtbackup"
    fi
    printf '%s\n' "$want" > "$QEMU_CONF"
    if pgrep -x libvirtd >/dev/null; then
        log "restarting libvirtd for the new qemu.conf"
        pkill -x libvirtd || true
        for _ in $(seq 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
    fi
fi

pgrep -x virtlogd >/dev/null || virtlogd -d
if ! pgrep -x libvirtd >/dev/null; then
    log "starting libvirtd"
    libvirtd -d
fi
for _ in $(seq 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.1
done
virsh -c qemu:///system version >/dev/null

# Debian's python3 (not whatever python3 is first on PATH): its dist-packages hold the
# python3-guestfs and python3-libnbd bindings, which are not on PyPI.
SYS_PYTHON=/usr/bin/python3
stamp="$VENV/.virtbackup-installed"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    log "dependencies changed: recreating $VENV"
    rm -rf "$VENV"
fi
if [ -x "$VENV/bin/python" ] && ! grep -q '^include-system-site-packages = true' "$VENV/pyvenv.cfg" 2>/dev/null; then
    log "virtualenv does not see Debian's bindings: recreating $VENV"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV (from $SYS_PYTHON, with system site packages)"
    "$SYS_PYTHON" -m venv --system-site-packages "$VENV"
fi
if [ ! -f "$stamp" ]; then
    log "installing virtbackup into $VENV"
    pip_log="$VENV/pip-install.log"
    if ! { "$VENV/bin/pip" install --upgrade pip && "$VENV/bin/pip" install -e "$ROOT[test]"; } >"$pip_log" 2>&1; then
        tail -20 "$pip_log" >&2
        echo "setup-host: pip install failed (full log: $pip_log)" >&2
        exit 1
    fi
    touch "$stamp"
fi
# the Backups page for Cockpit (docs/cockpit.md); the browser tests install their own copy per test user
"$ROOT/scripts/install-cockpit.sh" >/dev/null
log "ready (libvirtd running, venv $VENV)"
