"""One module per QEMU program virtbackup runs itself: qemu-img, a private QEMU over QMP, qemu-nbd
(through libnbd, for the NBD copy). No libvirt here."""
