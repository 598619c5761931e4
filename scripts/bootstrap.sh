#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv.
# Usage: scripts/bootstrap.sh [EXTRAS]   e.g. scripts/bootstrap.sh dev,llm
# Re-installs only when pyproject.toml changed or an extra is missing: the stamp records the
# extras installed as a set, a set that holds the requested ones satisfies the request, and
# an install keeps the extras already there (so demo.sh and test.sh never undo each other).
# BASTION_BOOTSTRAP_DRY_RUN=1 prints the install commands instead of running them and
# records the stamp as if they had run (for tests of this script).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
dry="${BASTION_BOOTSTRAP_DRY_RUN:-}"

# "llm, dev,,dev" -> "dev,llm"
normalise() { tr ', ' '\n\n' <<<"$1" | grep -v '^$' | sort -u | paste -sd, - || true; }

extras="$(normalise "${1:-}")"
if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "Bastion needs Python 3.11 or newer ($py is $("$py" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv" >&2
  "$py" -m venv .venv
fi
hash="$(sha256sum pyproject.toml | cut -c1-16)"
stamp=.venv/.bastion-install-stamp
old="$(cat "$stamp" 2>/dev/null || true)"
old_hash="${old%% *}"
old_extras=""
case "$old" in *"extras=["*) old_extras="${old#*extras=[}"; old_extras="${old_extras%]}" ;; esac
old_extras="$(normalise "$old_extras")"
union="$(normalise "$old_extras,$extras")"
if [ -n "$old" ] && [ "$old_hash" = "$hash" ] && [ "$union" = "$old_extras" ]; then
  exit 0  # everything asked for is installed already
fi
run() {
  if [ -n "$dry" ]; then echo "would run: $*"; else "$@"; fi
}
echo "installing Bastion into .venv (extras: ${union:-none}); the first time takes a few minutes" >&2
# The CPU build of torch, pinned: an unpinned torch would pull a multi-GB CUDA build.
run .venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
# onnx2torch (the onnx extra's ONNX-to-torch converter) declares torchvision as a
# dependency, which would pull another torch build: it is installed without its
# dependencies (it needs only torch and onnx, which the extra brings).
case ",$union," in
  *,onnx,*) run .venv/bin/python -m pip install --quiet --disable-pip-version-check \
              --no-deps onnx2torch==1.5.15 ;;
esac
spec="."
[ -n "$union" ] && spec=".[$union]"
run .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
echo "$hash extras=[$union]" > "$stamp"
