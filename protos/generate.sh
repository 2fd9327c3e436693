#!/usr/bin/env bash
# Regenerates the committed Python stubs of the genie.v1 protos (see protos/generate.py).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" protos/generate.py "$@"
