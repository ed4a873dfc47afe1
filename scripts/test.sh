#!/usr/bin/env bash
# Set up (virtualenv, clipper with its test extras, the Debian data packages) and run the tests.
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity -x
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh dev
# The real-data tests need these; without them they are skipped with the reason.
clipper data fetch || echo "test.sh: Debian data packages unavailable; real-data tests will be skipped"
python -m pytest "$@"
