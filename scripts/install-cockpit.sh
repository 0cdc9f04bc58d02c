#!/bin/bash
# Install virtbackup's Cockpit page ("Backups"), from cockpit/ in this repository.
#
#   scripts/install-cockpit.sh                 copy to /usr/share/cockpit/virtbackup (root)
#   scripts/install-cockpit.sh DEST            copy to DEST (e.g. ~/.local/share/cockpit/virtbackup)
#   scripts/install-cockpit.sh --link [DEST]   a symlink to the repository's cockpit/ (development)
#   scripts/install-cockpit.sh --remove [DEST] remove what an earlier run installed there
#
# Cockpit finds packages in /usr/share/cockpit/<name> and in each user's
# ~/.local/share/cockpit/<name>; no restart is needed (log in again to see a new menu entry).
# The page runs `virtbackup` as root through Cockpit's superuser (sudo): root's PATH must find
# it (/usr/local/bin/virtbackup, e.g. a link to .venv/bin/virtbackup), or set its absolute path
# in the page's Settings (/etc/virtbackup/cockpit.json).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/cockpit"
mode=copy
case "${1:-}" in
    --link) mode=link; shift ;;
    --remove) mode=remove; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "install-cockpit: unknown option $1 (see --help)" >&2; exit 2 ;;
esac
DEST="${1:-/usr/share/cockpit/virtbackup}"
case "$DEST" in
    /*) ;;
    *) echo "install-cockpit: DEST must be an absolute path, not '$DEST'" >&2; exit 2 ;;
esac
FILES=(manifest.json index.html model.js virtbackup.js virtbackup.css)

remove() {
    if [ -L "$DEST" ]; then
        rm -f -- "$DEST"
    elif [ -d "$DEST" ]; then
        for f in "${FILES[@]}"; do rm -f -- "$DEST/$f"; done
        rmdir -- "$DEST" 2>/dev/null || echo "install-cockpit: $DEST holds other files; left in place" >&2
    fi
}

case "$mode" in
    remove)
        remove
        echo "install-cockpit: removed $DEST"
        ;;
    link)
        remove
        mkdir -p -- "$(dirname "$DEST")"
        ln -s -- "$SRC" "$DEST"
        echo "install-cockpit: $DEST -> $SRC"
        ;;
    copy)
        [ -L "$DEST" ] && rm -f -- "$DEST"
        install -d -m 0755 -- "$DEST"
        for f in "${FILES[@]}"; do install -m 0644 -- "$SRC/$f" "$DEST/$f"; done
        echo "install-cockpit: installed the Backups page in $DEST"
        ;;
esac
