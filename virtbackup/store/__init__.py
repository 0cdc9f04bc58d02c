"""The backup directory: chain metadata, image digests and integrity, encryption records, run logs,
retention and metrics. No libvirt here: a backup dir is readable and restorable without it."""
