"""How a passphrase reaches the QEMU programs virtbackup runs, and how LUKS qcow2 images are made.

The key never goes on a command line, into a log line or an error message (`Key` hides itself in
repr/str): qemu-img and qemu-io read it from a pipe (`--object secret,file=/dev/fd/N`), a private
QEMU from a 0600 file in a private 0700 directory that is removed once QEMU has read it. Reading
the key file and the chain's key check are store/crypto.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

from virtbackup import env
from virtbackup.errors import OperationFailed, UnsafePath

FORMAT: Literal["luks"] = "luks"
# QEMU's LUKS defaults (qemu-img info shows them): cipher-alg aes-256, cipher-mode xts,
# ivgen-alg plain64, hash-alg sha256. Written out at create time so a future QEMU default
# can't change what a chain uses half-way.
CIPHER_ALG = "aes-256"
CIPHER_MODE = "xts"
IVGEN_ALG = "plain64"
HASH_ALG = "sha256"
CIPHER = f"{CIPHER_ALG}-{CIPHER_MODE}-{IVGEN_ALG}"

MAX_KEY_BYTES = 4096          # a passphrase, not a disk image someone pointed --key-file at
SECRET_ID = "vbkey0"          # QEMU object id of the key in every qemu-img run
DEFAULT_ITER_TIME_MS = 1000   # LUKS key derivation ms per image (see store/crypto.py)


class Key:
    """A passphrase in memory. Its repr and str never show it, so it can't leak into a message."""

    __slots__ = ("_data", "source")

    def __init__(self, data: bytes, source: str):
        self._data = data
        self.source = source            # where it came from, for messages ("stdin", a path)

    @property
    def data(self) -> bytes:
        return self._data

    def __repr__(self) -> str:
        return f"<Key from {self.source}>"

    __str__ = __repr__



# --- the key for qemu-img / qemu-io: a pipe -----------------------------------------------------
@contextmanager
def key_pipe(key: Key) -> Iterator[Tuple[List[str], int]]:
    """`--object secret,...,file=/dev/fd/N` arguments and the fd N to pass to the child.

    The key sits in a pipe's buffer (it is far smaller than one), so it is never in a file or an
    argv; the child reads it once when it creates the object. Both ends are closed on exit.
    """
    if len(key.data) > MAX_KEY_BYTES:      # would not fit a pipe buffer on every system: a hang
        raise ValueError("key too long for a pipe")
    r, w = os.pipe()
    try:
        os.write(w, key.data)
        os.close(w)
        w = -1
        yield ["--object", secret_object(SECRET_ID, f"/dev/fd/{r}")], r
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)


def secret_object(obj_id: str, path: str) -> str:
    """A QEMU `secret` object that reads the passphrase (raw bytes) from a file."""
    return f"secret,id={obj_id},file={qemu_opt(path)},format=raw"


def qemu_opt(value: str) -> str:
    """Escape a value for QEMU's key=value,... syntax (a comma is doubled)."""
    return value.replace(",", ",,")


def image_opts(path: Path, encrypted_layers: Sequence[bool], secret_id: str = SECRET_ID) -> str:
    """`--image-opts` for a qcow2 whose backing chain has these layers (top first) encrypted.

    The backing files are still found through the images' headers; each encrypted layer just
    gets the key (`backing.backing.encrypt.key-secret=...`). The path must be absolute: QEMU
    cannot resolve relative backing names below an image given by options.
    """
    if not os.path.isabs(path):
        raise ValueError(f"image path {path} must be absolute")
    opts = [f"driver=qcow2,file.filename={qemu_opt(str(path))}"]
    for depth, enc in enumerate(encrypted_layers):
        if enc:
            opts.append(f"{'backing.' * depth}encrypt.key-secret={secret_id}")
    return ",".join(opts)


def json_image(path: Path, encrypted_layers: Sequence[bool], secret_id: str = SECRET_ID) -> str:
    """The same as `image_opts`, as a `json:` pseudo file name (for where QEMU takes only a
    file name, e.g. the new backing file of a safe `qemu-img rebase`)."""
    if not os.path.isabs(path):
        raise ValueError(f"image path {path} must be absolute")
    spec: Dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}}
    node = spec
    for depth, enc in enumerate(encrypted_layers):
        if depth:
            child: Dict[str, Any] = {}
            node["backing"] = child
            node = child
        if enc:
            node["encrypt"] = {"key-secret": secret_id}
    return "json:" + json.dumps(spec, separators=(",", ":"))


def create_options(iter_time: int, secret_id: str = SECRET_ID) -> List[str]:
    """qcow2 `-o` options for a new LUKS-encrypted image."""
    return [f"encrypt.format={FORMAT}", f"encrypt.key-secret={secret_id}", f"encrypt.cipher-alg={CIPHER_ALG}",
            f"encrypt.cipher-mode={CIPHER_MODE}", f"encrypt.ivgen-alg={IVGEN_ALG}",
            f"encrypt.hash-alg={HASH_ALG}", f"encrypt.iter-time={iter_time}"]


# --- the key for a private QEMU: a file, for as long as QMP object-add takes --------------------
KEY_DIR_PREFIX = "virtbackup-key-"


def key_base() -> Optional[str]:
    """Where key directories go: /dev/shm (tmpfs: never on a disk) when we can write there, else
    $TMPDIR or /tmp (None)."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None


def remove_leftover_key_dirs() -> None:
    """Key directories of runs that were killed while QEMU read their key: removed by every run
    that reads a key, not only by one that makes a key file itself (the soak found one that
    outlived push backups, prunes and restores). Never raises: a leftover is reported by the
    next try, not fatal to this run."""
    import tempfile
    base = key_base()
    try:
        st = os.stat(base or tempfile.gettempdir())
        if env.unsafe_dir(st) is None:
            env.remove_dead_tempdirs(KEY_DIR_PREFIX, base)
    except OSError:
        pass


@contextmanager
def key_file(key: Key) -> Iterator[Path]:
    """The key in a 0600 file inside a fresh 0700 directory (tmpfs when there is one); both are
    removed on exit, and by the next run when this one is killed before that. For QEMU processes
    that can't be handed a pipe (QMP over stdio).

    The base directory must be owned by root or us and not writable by other users unless sticky
    (env.unsafe_dir): in a plain world-writable one, another user could rename our directory away
    and put a symlink in its place between its creation and the key's. The key file is created
    relative to an fd of the directory we made (checked: ours, 0700), exclusively, never through a link."""
    import tempfile

    base = key_base()
    where = base or tempfile.gettempdir()
    try:
        st = os.stat(where)
    except OSError as e:
        raise OperationFailed(f"cannot use {where} for a key file: {e.strerror}") from None
    problem = env.unsafe_dir(st)
    if problem:
        raise UnsafePath(f"not writing a key file into {where}: {problem}")
    # a run killed while QEMU read its key left the key behind: remove those first
    env.remove_dead_tempdirs(KEY_DIR_PREFIX, base)
    d = env.owned_tempdir(KEY_DIR_PREFIX, base)
    try:
        dfd = env.open_dir(d, follow=False)
        try:
            st = os.fstat(dfd)
            if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
                raise UnsafePath(f"{d} changed under us (owner {st.st_uid}, mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}); not writing a key file into it")
            fd = os.open("key", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dfd)
            try:
                os.write(fd, key.data)
            finally:
                os.close(fd)
        finally:
            os.close(dfd)
        yield Path(d) / "key"
    finally:
        shutil.rmtree(d, ignore_errors=True)
