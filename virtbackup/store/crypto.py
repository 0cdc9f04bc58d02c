"""Encryption at rest: LUKS-encrypted qcow2 images keyed by a passphrase the user keeps in a file.

Why LUKS inside qcow2: QEMU writes it natively (libvirt push targets take `<encryption>`) and
`qemu-img`/`qemu-io` read it with the key, so an encrypted backup directory still restores with
QEMU's own tools and nothing of virtbackup. Backing chains work as before: each image has its own
LUKS header (own master key) unlocked by the same passphrase.

Where the key goes, and never goes:
- never on a command line, in a log line or in an error message (`Key` hides itself in repr/str);
- to `qemu-img`/`qemu-io` through a pipe: `--object secret,file=/dev/fd/N` (nothing on disk);
- to a private QEMU through a 0600 file in a private 0700 directory, deleted once QEMU has read it;
- to libvirt as an ephemeral, private secret (never written to disk by libvirt, its value not
  readable back through the API), undefined when the job ends, also on failure and on signals
  (keysecret.py; this module has no libvirt, so a backup dir is readable without it).

The chain metadata keeps a key check value (a salted PBKDF2 derivation of the passphrase, not
the passphrase) so that a wrong key is refused before any work, with exit 2.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Dict, Optional

from virtbackup.errors import UsageError
from virtbackup.qemu.keys import (
    CIPHER,
    DEFAULT_ITER_TIME_MS,
    FORMAT,
    HASH_ALG,
    MAX_KEY_BYTES,
    Key,
    remove_leftover_key_dirs,
)

# LUKS key derivation time per image (PBKDF2 iterations are calibrated by QEMU to take this
# long on this host). An attacker with a backup image pays it per passphrase guess; we pay it
# every time an image is opened (each link of a chain, at every backup, restore and verify).
# QEMU's and cryptsetup's default is 2000 ms; 1000 ms halves the cost of reading long chains
# for one bit of brute-force resistance. A random key file (docs/guide.md) makes it irrelevant.
ITER_TIME_ENV = "VIRTBACKUP_ENCRYPT_ITER_TIME"
MAX_ITER_TIME_MS = 60_000

KEY_CHECK_KDF = "pbkdf2-sha256"
KEY_CHECK_MIN_ITERATIONS = 100_000


# --- reading the key ---------------------------------------------------------------------------
def _check_key_bytes(data: bytes, where: str) -> bytes:
    if not data:
        raise UsageError(f"{where} is empty; it must hold the passphrase")
    if len(data) > MAX_KEY_BYTES:
        raise UsageError(f"{where} holds more than {MAX_KEY_BYTES} bytes; that is not a passphrase file")
    try:
        text = b"\0" not in data and bool(data.decode("utf-8", errors="strict"))
    except UnicodeDecodeError:
        text = False
    if not text:
        # QEMU's LUKS driver takes passphrases as UTF-8 text without NUL bytes
        raise UsageError(f"{where} is not text: the passphrase must be UTF-8 without NUL bytes "
                         "(make a random one with: head -c 32 /dev/urandom | base64 > KEYFILE)")
    return data


def read_key(spec: str, stdin: Optional[BinaryIO] = None) -> Key:
    """The passphrase from `--key-file SPEC`: exactly the file's bytes (a trailing newline too,
    so that `qemu-img --object secret,file=SPEC` unlocks the same images by hand).

    `-` reads stdin, but never a terminal (typed secrets end up in shell history and on screen).
    Refused with exit 2: a symlink (the key is what the named file holds, not whatever it points
    at today), anything but a regular file, a file other users can access, empty or binary data.
    """
    remove_leftover_key_dirs()      # D7: whatever a killed run left goes with the next run that holds a key
    if spec == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        try:
            tty = os.isatty(stream.fileno())
        except (AttributeError, OSError, ValueError):
            tty = False
        if tty:
            raise UsageError("refusing to read the key from a terminal (--key-file -); pipe it in "
                             "or give a key file")
        return Key(_check_key_bytes(stream.read(MAX_KEY_BYTES + 1), "the key on stdin"), "stdin")
    if not spec:
        raise UsageError("--key-file needs a file name (or - for stdin)")
    try:
        fd = os.open(spec, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(spec):
            raise UsageError(f"key file {spec} is a symbolic link; give the file itself "
                             "(or pipe the key in with --key-file -)") from None
        if e.errno == 2:
            raise UsageError(f"key file {spec} does not exist") from None
        raise UsageError(f"cannot read key file {spec}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"key file {spec} is not a regular file (pipe a key in with --key-file -)")
        if st.st_mode & 0o077:
            raise UsageError(f"key file {spec} is accessible by other users (mode {st.st_mode & 0o777:04o}); "
                             f"chmod 600 it first")
        chunks = []
        total = 0
        while total <= MAX_KEY_BYTES:
            buf = os.read(fd, MAX_KEY_BYTES + 1 - total)
            if not buf:
                break
            chunks.append(buf)
            total += len(buf)
        data = b"".join(chunks)
    except OSError as e:
        raise UsageError(f"cannot read key file {spec}: {e.strerror}") from None
    finally:
        os.close(fd)
    return Key(_check_key_bytes(data, f"key file {spec}"), spec)


def iter_time_ms() -> int:
    """LUKS key derivation time for new images: $VIRTBACKUP_ENCRYPT_ITER_TIME or the default."""
    raw = os.environ.get(ITER_TIME_ENV, "").strip()
    if not raw:
        return DEFAULT_ITER_TIME_MS
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_ITER_TIME_MS:
        raise UsageError(f"{ITER_TIME_ENV}={raw!r}: give milliseconds, 1 to {MAX_ITER_TIME_MS}")
    return int(raw)


# --- what the chain metadata records -----------------------------------------------------------
def _pbkdf2(key: Key, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", key.data, salt, iterations, dklen=32)


def _calibrate(target_ms: int) -> int:
    """PBKDF2 iterations that take about `target_ms` here, like QEMU calibrates the LUKS slot.

    The check value is a second target for guessing the passphrase offline, next to every
    image's LUKS header: it must cost an attacker at least as much per guess.
    """
    probe = 20_000
    t0 = time.perf_counter()
    hashlib.pbkdf2_hmac("sha256", b"calibrate", b"\0" * 16, probe)
    per_ms = probe / max((time.perf_counter() - t0) * 1000.0, 0.001)
    return max(KEY_CHECK_MIN_ITERATIONS, int(per_ms * target_ms))


@dataclass
class ChainEncryption:
    """How a chain is encrypted, as stored in its metadata (never the key)."""

    format: str
    cipher: str
    hash: str
    iter_time_ms: int
    key_check_kdf: str
    key_check_salt: str         # hex
    key_check_iterations: int
    key_check: str              # hex PBKDF2-HMAC-SHA256(passphrase, salt, iterations)

    @classmethod
    def new(cls, key: Key, iter_time: int) -> "ChainEncryption":
        salt = secrets.token_bytes(16)
        iterations = _calibrate(iter_time)
        return cls(FORMAT, CIPHER, HASH_ALG, iter_time, KEY_CHECK_KDF, salt.hex(), iterations,
                   _pbkdf2(key, salt, iterations).hex())

    def matches(self, key: Key) -> bool:
        got = _pbkdf2(key, bytes.fromhex(self.key_check_salt), self.key_check_iterations)
        return hmac.compare_digest(got.hex(), self.key_check)

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "ChainEncryption":
        if not isinstance(data, dict):
            raise ValueError("encryption is not an object")
        enc = cls(**data)
        if enc.format != FORMAT:
            raise ValueError(f"unsupported encryption format {enc.format!r}")
        if enc.key_check_kdf != KEY_CHECK_KDF:
            raise ValueError(f"unsupported key check {enc.key_check_kdf!r}")
        for name in ("iter_time_ms", "key_check_iterations"):
            v = getattr(enc, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"encryption {name} {v!r} is not a positive integer")
        if not re.fullmatch(r"[0-9a-f]{32}", str(enc.key_check_salt)) or \
                not re.fullmatch(r"[0-9a-f]{64}", str(enc.key_check)):
            raise ValueError("encryption key check is malformed")
        return enc


def check_key(enc: Optional[ChainEncryption], key: Optional[Key], what: str) -> None:
    """Refuse (exit 2, before any work) a missing or wrong key for an encrypted chain, and a key
    for a chain that is not encrypted (a mix-up the user wants to hear about)."""
    if enc is None:
        if key is not None:
            raise UsageError(f"{what} is not encrypted; --key-file is only for encrypted backups")
        return
    if key is None:
        raise UsageError(f"{what} is encrypted; give its key with --key-file FILE")
    if not enc.matches(key):
        raise UsageError(f"the key from {key.source} is not the key of {what} (key check failed); "
                         "nothing was changed")
