#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests (tests/test_postgres.py), on 127.0.0.1 only.
#
#   source .ci/postgres.sh             # starts it and exports LENSNAS_TEST_POSTGRES_URL
#   eval "$(bash .ci/postgres.sh)"     # the same: run, it prints the export line
#   bash .ci/postgres.sh stop          # stops it (the data folder is kept)
#
# Idempotent: installs PostgreSQL with apt-get when no initdb is found under
# /usr/lib/postgresql/*/bin, creates the cluster once, starts it unless it runs, creates
# the role and the database unless they exist. Messages go to stderr.
# Settings: LENSNAS_PG_PORT (55432), LENSNAS_PG_DATA (/tmp/lensnas-postgres).

# The work runs in a subshell: sourcing this file changes nothing in the caller but the URL.
_lensnas_postgres() (
    set -euo pipefail
    port="${LENSNAS_PG_PORT:-55432}"
    data="${LENSNAS_PG_DATA:-/tmp/lensnas-postgres}"
    role=lensnas
    password=lensnas-test-only
    database=lensnas

    say() { echo "postgres.sh: $*" >&2; }
    bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
    # PostgreSQL refuses to run as root: run it as the postgres user then.
    as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

    bin="$(bin_dir)"
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
        if [ "$(id -u)" != 0 ]; then
            say "PostgreSQL is not installed; installing it needs root (apt-get install postgresql)"
            exit 1
        fi
        say "installing PostgreSQL (apt-get)"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        bin="$(bin_dir)"
    fi

    if [ "${1:-}" = stop ]; then
        as_owner "$bin/pg_ctl" -D "$data" -m fast stop >&2 || true
        exit 0
    fi

    if [ ! -f "$data/PG_VERSION" ]; then
        say "creating a cluster in $data"
        mkdir -p "$data"
        chmod 700 "$data"
        if [ "$(id -u)" = 0 ]; then chown postgres: "$data"; fi
        as_owner "$bin/initdb" -D "$data" -U postgres -E UTF8 \
            --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    fi

    if ! as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        say "starting PostgreSQL on 127.0.0.1:$port"
        as_owner "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w \
            -o "-p $port -k $data -c listen_addresses=127.0.0.1 -c max_connections=200" \
            start >/dev/null
    fi

    psql_admin() {
        as_owner "$bin/psql" -h "$data" -p "$port" -U postgres -d postgres \
            -v ON_ERROR_STOP=1 -qtA "$@"
    }
    if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$role'")" != 1 ]; then
        psql_admin -c "CREATE ROLE $role LOGIN PASSWORD '$password'" >&2
    fi
    if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" != 1 ]; then
        psql_admin -c "CREATE DATABASE $database OWNER $role" >&2
    fi
    echo "postgresql://$role:$password@127.0.0.1:$port/$database"
)

if [ "${BASH_SOURCE[0]}" != "$0" ]; then  # sourced
    if _lensnas_postgres_url="$(_lensnas_postgres "$@")" && [ -n "$_lensnas_postgres_url" ]; then
        export LENSNAS_TEST_POSTGRES_URL="$_lensnas_postgres_url"
        unset -f _lensnas_postgres
        unset _lensnas_postgres_url
    else
        unset -f _lensnas_postgres
        unset _lensnas_postgres_url
        return 1
    fi
else
    set -euo pipefail
    url="$(_lensnas_postgres "$@")"
    if [ -n "$url" ]; then echo "export LENSNAS_TEST_POSTGRES_URL=$url"; fi
fi
