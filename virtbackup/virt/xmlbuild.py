"""Backup and checkpoint XML, built with lxml from the templates in xml-templates/."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal, Mapping, Optional

from lxml import etree


@dataclass(frozen=True)
class Encryption:
    """How a target image is encrypted (LUKS in qcow2, through a libvirt secret).

    Set by the backup engine on every target of an encrypted chain (plan.TargetSpec.encryption);
    runners pass it into the target they open (libvirt's <target><encryption>; the offline
    runner's blockdev-add with encrypt.key-secret). Never the key itself."""

    format: Literal["luks"]
    secret_uuid: str                     # libvirt secret holding the passphrase
    iter_time_ms: Optional[int] = None   # LUKS key derivation time chosen at create


def _template_dir() -> Path:
    """Installed: the templates ship inside the package (virtbackup/_templates, package data).
    Source checkout: the top-level xml-templates/ directory they are built from."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_templates", package.parent / "xml-templates"):
        if (candidate / "domainbackup.xml").is_file():
            return candidate
    return package / "_templates"


TEMPLATE_DIR = _template_dir()


@lru_cache(maxsize=None)
def _template(name: str) -> etree._Element:
    parser = etree.XMLParser(remove_comments=True, remove_blank_text=True)
    return etree.parse(str(TEMPLATE_DIR / name), parser).getroot()


def fresh(name: str) -> etree._Element:
    """A private copy of a template's root element, to fill in."""
    return copy.deepcopy(_template(name))


_fresh = fresh


def to_string(elem: etree._Element) -> str:
    return etree.tostring(elem, pretty_print=True, encoding="unicode")


@dataclass(frozen=True)
class BackupDisk:
    """One disk's part in a push backup."""

    name: str                  # target dev, e.g. "vda"
    target: Optional[Path]     # pre-created qcow2; None = disk does not take part
    full: bool = False         # force a full copy of this disk inside an incremental backup
    encryption: Optional[Encryption] = None   # LUKS target (passed through from the plan)


def _domainbackup(template: str, incremental: Optional[str]) -> etree._Element:
    """A <domainbackup> from its template, with <incremental> naming the base checkpoint unless full."""
    root = _fresh(template)
    if incremental is not None:
        inc = etree.Element("incremental")
        inc.text = incremental
        root.insert(0, inc)
    return root


def backup_xml(disks: Iterable[BackupDisk], incremental: Optional[str]) -> str:
    """Push-mode <domainbackup>; `incremental` names the base checkpoint (None = full)."""
    root = _domainbackup("domainbackup.xml", incremental)
    disks_el = root.find("disks")
    assert disks_el is not None
    for d in disks:
        if d.target is None:
            etree.SubElement(disks_el, "disk", name=d.name, backup="no")
            continue
        el = _fresh("domainbackup-disk.xml")
        el.set("name", d.name)
        if incremental is not None and d.full:
            el.set("backupmode", "full")
        target = el.find("target")
        assert target is not None
        target.set("file", str(d.target))
        if d.encryption is not None:
            # the target is a pre-created LUKS qcow2: QEMU opens it with this secret's key
            enc = _fresh("encryption-luks.xml")
            enc.set("format", d.encryption.format)
            sec = enc.find("secret")
            assert sec is not None
            sec.set("uuid", d.encryption.secret_uuid)
            target.append(enc)
        disks_el.append(el)
    return to_string(root)


@dataclass(frozen=True)
class PullDisk:
    """One disk's part in a pull backup."""

    name: str                       # target dev, e.g. "vda"; also its NBD export name
    scratch: str                    # scratch file on the hypervisor (absolute)
    full: bool = False              # whole disk inside an incremental backup (no bitmap export)

    @property
    def export_bitmap(self) -> str:
        return f"backup-{self.name}"


@dataclass(frozen=True)
class NbdServer:
    """Where libvirt's NBD server listens: a unix socket, or TCP name and port."""

    socket: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    tls: bool = False


def pull_backup_xml(disks: Iterable[PullDisk], incremental: Optional[str], server: NbdServer) -> str:
    """Pull-mode <domainbackup>; `incremental` names the base checkpoint (None = full).

    Export names and bitmap names are set explicitly (they are what the NBD client asks for),
    even where they equal libvirt's defaults.
    """
    root = _domainbackup("domainbackup-pull.xml", incremental)
    srv = root.find("server")
    assert srv is not None
    if server.socket:
        srv.set("socket", server.socket)
    else:
        srv.set("transport", "tcp")
        srv.set("name", server.host or "localhost")
        srv.set("port", str(server.port))
    if server.tls:
        srv.set("tls", "yes")
    disks_el = root.find("disks")
    assert disks_el is not None
    for d in disks:
        el = _fresh("domainbackup-pull-disk.xml")
        el.set("name", d.name)
        el.set("exportname", d.name)
        if incremental is not None:
            if d.full:
                el.set("backupmode", "full")
            else:
                el.set("exportbitmap", d.export_bitmap)
        # libvirt 9.0 has no default scratch file for pull mode (it fails with "argument key
        # 'filename' must not have null value"): there always is one
        scratch = el.find("scratch")
        assert scratch is not None
        scratch.set("file", d.scratch)
        disks_el.append(el)
    return to_string(root)


def checkpoint_xml(name: str, description: str, disks: Mapping[str, bool]) -> str:
    """<domaincheckpoint> with a bitmap on each disk mapped to True and checkpoint='no' elsewhere."""
    root = _fresh("domaincheckpoint.xml")
    name_el = root.find("name")
    desc_el = root.find("description")
    disks_el = root.find("disks")
    assert name_el is not None and desc_el is not None and disks_el is not None
    name_el.text = name
    desc_el.text = description
    for disk, take_part in disks.items():
        if take_part:
            etree.SubElement(disks_el, "disk", name=disk, checkpoint="bitmap", bitmap=name)
        else:
            etree.SubElement(disks_el, "disk", name=disk, checkpoint="no")
    return to_string(root)


def redefine_xml(saved_xml: str, parent: Optional[str]) -> str:
    """Saved checkpoint XML with its <parent> replaced, ready for CREATE_REDEFINE."""
    root = etree.fromstring(saved_xml.encode())
    for old in root.findall("parent"):
        root.remove(old)
    if parent is not None:
        p = etree.Element("parent")
        etree.SubElement(p, "name").text = parent
        name_el = root.find("name")
        idx = list(root).index(name_el) + 1 if name_el is not None else 0
        root.insert(idx, p)
    return to_string(root)


def parse(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode())
