#!/usr/bin/env bash
# The device carry (64 MiB) counts the tracked tree, and the tracked weights (sharp-small's, the
# rebuild's checkpoints under research/checkpoints) alone exceed it. `off` takes every tracked
# *.safetensors over 4 MB out of the index (and hides it), `on` puts them back. Never commit between the two.
#   bash research/carry.sh off; <device call>; bash research/carry.sh on
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
list=.git/info/carry-hidden
case ${1:?off or on} in
  off) git ls-files '*.safetensors' | while read -r f; do [ "$(stat -c %s "$f")" -gt 4000000 ] && echo "$f"; done > "$list" || true
       [ -s "$list" ] || exit 0
       git rm -q --cached --pathspec-from-file="$list"
       sed 's|^|/|' "$list" >> .git/info/exclude ;;
  on)  [ -s "$list" ] || exit 0
       while read -r f; do grep -vxF "/$f" .git/info/exclude > .git/info/exclude.new || true
         mv .git/info/exclude.new .git/info/exclude; done < "$list"
       git reset -q HEAD --pathspec-from-file="$list"
       rm "$list" ;;
  *) echo "carry.sh: off or on" >&2; exit 2 ;;
esac
git status --short | grep -v '^??' || true
