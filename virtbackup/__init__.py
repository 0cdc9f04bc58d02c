"""virtbackup: full, incremental and differential backups of libvirt/QEMU domains."""

import logging

__version__ = "0.3.0.dev0"     # the one place; pyproject.toml reads it

# Library practice: records go nowhere unless the application (the CLI, or a program using the
# API) configures logging; never to Python's last-resort stderr handler.
logging.getLogger(__name__).addHandler(logging.NullHandler())
