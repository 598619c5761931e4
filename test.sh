#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs into .venv (and Debian's
# chromium for the dashboard's browser tests), then runs pytest on two workers. Tests that
# need MNIST or the prompt-injection corpus read them from ../shared/datasets (override with
# BASTION_SHARED=/path/to/shared).
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh "dev,llm,ray"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the browser tests" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: /usr/bin/chromium is missing; the dashboard browser tests will be skipped" \
         "(install it with: sudo apt-get install chromium)" >&2
  fi
fi
export MPLBACKEND=Agg
# --dist loadgroup: the Ray tests (xdist_group "ray") share one worker and one test cluster
exec .venv/bin/python -m pytest -n 2 --dist loadgroup -q "$@"
