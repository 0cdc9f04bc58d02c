"""`python -m virtbackup.cli`: the same as the `virtbackup` command."""

from virtbackup.cli import main

main()
