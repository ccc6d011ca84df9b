#!/usr/bin/env bash
# Check the package's layers with import-linter (contracts: [tool.importlinter] in pyproject.toml), on the package
# as installed (scripts/package_view.py: riskbridge/ with connectors/, harmonize/ and model/ inside it).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
view=$(mktemp -d)
trap 'rm -rf "$view"' EXIT
.venv/bin/python scripts/package_view.py "$view"
# From inside the view: import-linter puts the working directory first on the import path.
cd "$view"
PYTHONPATH="$view" "$root/.venv/bin/lint-imports" "$root/pyproject.toml" "$@"
