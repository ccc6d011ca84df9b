#!/bin/sh
# Runs first in every compose service that reads a secret (its entrypoint), then execs the service's own command.
# Refuses to start the service with a secret file that is missing, unreadable, empty, a well-known default (a
# placeholder, a service name, or a value this repository once committed), shorter than 16 characters, or with
# characters other than letters, digits and . _ ~ = + - (the services put secrets unescaped into URLs and JSON).
# Messages name the file, never its content. Generate the files with `riskbridge compose secrets`.
#
#   check-secrets.sh [FILE | --env NAME=FILE | --json FILE]... [-- COMMAND [ARG]...]
#
#   FILE              a secret file (e.g. /run/secrets/postgres_password)
#   --env NAME=FILE   a secret file, exported as NAME once checked (Orthanc reads ${NAME} in its configuration)
#   --json FILE       an Airflow connections file: every "password" value in it must not be a default
#
# Plain POSIX sh plus tr, sed and sha256sum: it runs in the Debian-based postgres, Orthanc and Airflow images.
# DEFAULT_WORDS and LEAKED_SHA256 equal riskbridge/credentials.py's (tests/unit/test_compose_secrets.py checks).
set -u
LC_ALL=C
export LC_ALL

DEFAULT_WORDS="change-me change-me-before-use changeme airflow postgres orthanc riskbridge admin password secret"
# SHA-256 digests of the Airflow Fernet key and JWT secret committed to docker/airflow/ before the security review.
LEAKED_SHA256="1190f1cd297c4a9d04958ca401798b40b933be99ed1560ba067622d3f9b6ac54
b4a7b78c678ecb335e7efe07f2c1da083d19cc95bc96243b228a5aa40254b089"
MIN_LENGTH=16

problems=0

refuse() {
    echo "check-secrets: $1" >&2
    problems=$((problems + 1))
}

# Without it the leaked values would pass unnoticed: refuse to judge rather than let them through.
if ! command -v sha256sum >/dev/null 2>&1; then
    echo "check-secrets: sha256sum not found in this image; cannot check the secret files" >&2
    exit 1
fi

# True when $1 is a default word (in any case) or hashes to a leaked value.
is_default() {
    lower=$(printf %s "$1" | tr '[:upper:]' '[:lower:]')
    for word in $DEFAULT_WORDS; do
        [ "$lower" = "$word" ] && return 0
    done
    digest=$(printf %s "$1" | sha256sum)
    digest=${digest%% *}
    for leaked in $LEAKED_SHA256; do
        [ "$digest" = "$leaked" ] && return 0
    done
    return 1
}

# Reads the secret file $1 into $value (trailing newlines dropped, as the services' own readers do); returns 1
# after refusing it.
read_secret() {
    value=
    if [ ! -e "$1" ]; then
        refuse "$1 is missing (run: riskbridge compose secrets)"
        return 1
    fi
    if [ ! -r "$1" ]; then
        refuse "$1 is not readable by uid $(id -u): the secret files are private to the user who generated them; set AIRFLOW_UID in docker/.env to that uid"
        return 1
    fi
    value=$(cat "$1") || { refuse "$1 could not be read"; return 1; }
    if [ -z "$value" ]; then
        refuse "$1 is empty"
        return 1
    fi
    return 0
}

check_secret_file() {
    read_secret "$1" || return 1
    if is_default "$value"; then
        refuse "$1 holds a well-known default secret: delete it and run riskbridge compose secrets"
        return 1
    fi
    if [ "${#value}" -lt "$MIN_LENGTH" ]; then
        refuse "$1 is shorter than $MIN_LENGTH characters"
        return 1
    fi
    case $value in
        *[!A-Za-z0-9._~=+-]*)
            refuse "$1 has characters other than letters, digits and . _ ~ = + - (it goes into URLs and JSON unescaped)"
            return 1
            ;;
    esac
    return 0
}

check_connections_file() {
    read_secret "$1" || return 1
    # One key per line whatever the layout, then the string value of every "password" key.
    passwords=$(printf '%s\n' "$value" | tr ',{}' '\n\n\n' \
        | sed -n 's/^[[:space:]]*"password"[[:space:]]*:[[:space:]]*"\(.*\)"[[:space:]]*$/\1/p')
    while IFS= read -r password; do
        if [ -n "$password" ] && is_default "$password"; then
            refuse "$1 has a connection whose password is a well-known default: delete it and run riskbridge compose secrets"
            return 1
        fi
    done <<EOF
$passwords
EOF
    return 0
}

while [ "$#" -gt 0 ]; do
    case $1 in
        --)
            shift
            break
            ;;
        --env)
            [ "$#" -ge 2 ] || { echo "check-secrets: --env needs NAME=FILE" >&2; exit 2; }
            name=${2%%=*}
            file=${2#*=}
            case $name in
                '' | [0-9]* | *[!A-Za-z0-9_]*)
                    echo "check-secrets: --env $2: not NAME=FILE" >&2
                    exit 2
                    ;;
            esac
            if check_secret_file "$file"; then
                export "$name=$value"
            fi
            shift 2
            ;;
        --json)
            [ "$#" -ge 2 ] || { echo "check-secrets: --json needs a FILE" >&2; exit 2; }
            check_connections_file "$2"
            shift 2
            ;;
        -*)
            echo "check-secrets: unknown option $1" >&2
            exit 2
            ;;
        *)
            check_secret_file "$1"
            shift
            ;;
    esac
done
if [ "$problems" -gt 0 ]; then
    echo "check-secrets: refusing to start with $problems bad secret file(s) (docs/operations.md \"Docker\")" >&2
    exit 1
fi
[ "$#" -gt 0 ] || exit 0
exec "$@"
