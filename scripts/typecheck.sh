#!/usr/bin/env bash
# mypy over the package as installed (riskbridge/ with connectors/, harmonize/, model/ inside it, so calls between
# the subpackages are checked too) and over tests/, dags/ and bench/; settings in pyproject.toml [tool.mypy].
# Paths in mypy's messages are mapped back to the repository's folders.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
view=$(mktemp -d)
trap 'rm -rf "$view"' EXIT
.venv/bin/python scripts/package_view.py "$view" tests dags bench
cd "$view"
status=0
"$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" --explicit-package-bases riskbridge tests dags bench \
  > "$view/mypy.out" 2>&1 || status=$?
sed -E 's#^riskbridge/(connectors|harmonize|model)/#\1/#' "$view/mypy.out"
exit "$status"
