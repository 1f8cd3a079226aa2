#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests (tests/test_postgres.py), on 127.0.0.1 only.
#
#   eval "$(bash .ci/postgres.sh)"     # prints: export LENSNAS_TEST_POSTGRES_URL=...
#   bash .ci/postgres.sh stop          # stops it (the data folder is kept)
#
# Idempotent: installs PostgreSQL with apt-get when no initdb is found under
# /usr/lib/postgresql/*/bin, creates the cluster once, starts it unless it runs, creates
# the role and the database unless they exist. Only the export line goes to stdout.
# Settings: LENSNAS_PG_PORT (55432), LENSNAS_PG_DATA (/tmp/lensnas-postgres).
set -euo pipefail

PORT="${LENSNAS_PG_PORT:-55432}"
DATA="${LENSNAS_PG_DATA:-/tmp/lensnas-postgres}"
ROLE=lensnas
PASSWORD=lensnas-test-only
DATABASE=lensnas

say() { echo "postgres.sh: $*" >&2; }

bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

# Run as the postgres user when we are root (PostgreSQL refuses to run as root).
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

BIN="$(bin_dir)"
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
    if [ "$(id -u)" != 0 ]; then
        say "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
        exit 1
    fi
    say "installing PostgreSQL (apt-get)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    BIN="$(bin_dir)"
fi

if [ "${1:-}" = stop ]; then
    as_owner "$BIN/pg_ctl" -D "$DATA" -m fast stop >&2 || true
    exit 0
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
    say "creating a cluster in $DATA"
    mkdir -p "$DATA"
    chmod 700 "$DATA"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$DATA"; fi
    as_owner "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 \
        --auth-local=trust --auth-host=scram-sha-256 >&2
fi

if ! as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    say "starting PostgreSQL on 127.0.0.1:$PORT"
    as_owner "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w \
        -o "-p $PORT -k $DATA -c listen_addresses=127.0.0.1 -c max_connections=200" start >&2
fi

psql_admin() {
    as_owner "$BIN/psql" -h "$DATA" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"
}
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
    psql_admin -c "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'" >&2
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != 1 ]; then
    psql_admin -c "CREATE DATABASE $DATABASE OWNER $ROLE" >&2
fi

echo "export LENSNAS_TEST_POSTGRES_URL=postgresql+psycopg2://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"
