#!/usr/bin/env bash
# Installs everything riskbridge needs on a Debian 12 machine, from packages only, and is safe to run again:
# the Debian packages (Orthanc + DICOMweb, dcmtk, PostgreSQL, Redis, Java 17, Maven), a Python 3.11 environment built
# from the committed constraints.txt (plus Airflow's Celery executor, pinned by docker/airflow/constraints-celery.txt),
# and the HAPI FHIR launcher jar (Maven, cached in ~/.m2).
# The environment is cached outside the clone, keyed by the hash of constraints.txt, and linked as .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[bootstrap %(%H:%M:%S)T] %s\n' -1 "$*"; }
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

# redis-server: the Celery broker of tests/integration/test_celery_run.py (which starts its own on a free port).
packages=(orthanc orthanc-dicomweb dcmtk postgresql redis-server docker-compose)
command -v java >/dev/null || packages+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || packages+=(maven)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  # Debian would start the packaged system services; riskbridge runs its own instances instead.
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "riskbridge needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 2; }

key=$(sha256sum constraints.txt | cut -c1-16)
cache=${RISKBRIDGE_CACHE:-$HOME/.cache/riskbridge}
venv=$cache/venv-$key
pip_log="$cache/pip-$key.log"
# The CeleryExecutor for the distributed-run test, with the same pins as riskbridge's Airflow image (Dockerfile).
celery=(-c docker/airflow/constraints-celery.txt "apache-airflow[celery]==3.3.2" apache-airflow-providers-celery)
quiet() { "$@" >>"$pip_log" 2>&1 || { tail -n 30 "$pip_log" >&2; echo "failed: $* (log: $pip_log)" >&2; exit 1; }; }
if [ ! -f "$venv/.complete" ]; then
  log "building the Python environment $venv (first time for this constraints.txt: several minutes)"
  rm -rf "$venv"
  mkdir -p "$cache"
  : >"$pip_log"
  "$python" -m venv "$venv"
  quiet "$venv/bin/pip" install --upgrade pip
  quiet "$venv/bin/pip" install -c constraints.txt -e ".[dev]" "${celery[@]}"
  "$venv/bin/pip" check
  touch "$venv/.complete"
fi
# Cheap when satisfied; points the cached environment's riskbridge at this clone (and adds Celery to an environment
# built before it was part of it).
quiet "$venv/bin/pip" install -c constraints.txt -e ".[dev]" "${celery[@]}"
ln -sfn "$venv" .venv
log "Python environment: .venv -> $venv"

jar=docker/hapi-fhir/target/riskbridge-hapi-fhir.jar
if [ ! -f "$jar" ] || [ -n "$(find docker/hapi-fhir/pom.xml docker/hapi-fhir/src -newer "$jar" -print -quit)" ]; then
  log "building the HAPI FHIR launcher (Maven; first time downloads to ~/.m2)"
  mvn -B -q -f docker/hapi-fhir/pom.xml package -DskipTests
fi
log "HAPI FHIR launcher: $jar"
