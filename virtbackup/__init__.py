"""virtbackup: full, incremental and differential backups of libvirt/QEMU domains."""

__version__ = "0.1.0"
