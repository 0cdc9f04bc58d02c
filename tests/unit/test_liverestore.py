"""The live-restore record kept in a domain's <metadata> (pure XML logic; a stub stands in for
the domain object, which only hands back the XML libvirt stored)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtbackup import liverestore
from virtbackup.errors import OperationFailed


class StubDomain:
    def __init__(self, xml: str):
        self.xml = xml

    def metadata(self, _type: int, _uri: str, _flags: int) -> str:
        return self.xml

    def name(self) -> str:
        return "stub"


def test_record_round_trip():
    images = {"vdb": Path("/out/vdb.qcow2"), "vda": Path("/out/vda.qcow2")}
    xml = liverestore._record_xml("/backups/web", "0007", images)
    assert liverestore._read_record(StubDomain(xml)) == ("/backups/web", "0007", images)


@pytest.mark.parametrize("xml", ["<live backup-dir='/b' point='0001'/>",                        # no disks
                                 "<live backup-dir='/b' point='0001'><disk target='vda' overlay='rel.qcow2'/></live>",
                                 "<live><disk"])
def test_damaged_record_is_refused(xml):
    with pytest.raises(OperationFailed, match="damaged live-restore record"):
        liverestore._read_record(StubDomain(xml))
