#!/usr/bin/env bash
# The team's tracking stack on one host: PostgreSQL (backend store) + `mlflow server` with proxied
# artifacts, optionally behind MLflow's basic auth. `make team-server` runs it in the foreground;
# Ctrl-C (or SIGTERM) stops MLflow and then PostgreSQL.
#
# Settings (environment):
#   TEAM_DIR     where the database cluster, artifacts and logs live (kept between starts)
#   HOST, PORT   where MLflow listens (default 127.0.0.1:5000; 0.0.0.0 to serve a team)
#   PGPORT       PostgreSQL's port; it listens on 127.0.0.1 only (default 5433)
#   AUTH=1       MLflow basic auth; the first start needs MLFLOW_AUTH_ADMIN_PASSWORD for the admin
#   AUTH_DEFAULT_PERMISSION  what a signed-in user may do to others' experiments (default EDIT:
#                the team shares one 'retrain' experiment; READ, then grant per experiment)
#   WORKERS      MLflow server workers (default 4)
# Nothing here stores a password: the admin password comes from the environment once, clients
# use MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or ~/.mlflow/credentials.
set -euo pipefail

if [ "$(id -u)" = 0 ]; then default_dir=/srv/retrain-team; else default_dir="${XDG_DATA_HOME:-$HOME/.local/share}/retrain-team"; fi
TEAM_DIR="${TEAM_DIR:-$default_dir}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5000}"
PGPORT="${PGPORT:-5433}"
WORKERS="${WORKERS:-4}"
MLFLOW="${MLFLOW:-$(dirname "$0")/../.venv/bin/mlflow}"
DB=mlflow
DB_USER=retrain

die() { echo "team-server: $*" >&2; exit 1; }

pg_bin() {  # Debian keeps initdb and pg_ctl off PATH, in /usr/lib/postgresql/<version>/bin
    if command -v pg_ctl >/dev/null; then dirname "$(readlink -f "$(command -v pg_ctl)")"; return; fi
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$found" ] || die "PostgreSQL not found: apt-get install postgresql (Debian 12 ships 15)"
    echo "$found"
}

as_pg() {  # PostgreSQL refuses to run as root: run its commands as the postgres user then
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

BIN=$(pg_bin)
[ -x "$MLFLOW" ] || die "$MLFLOW not found: run 'make venv' first (or set MLFLOW=/path/to/mlflow)"
"$(dirname "$MLFLOW")/python" -c "import psycopg, flask_wtf" 2>/dev/null \
    || die "the team server needs the team extra (PostgreSQL driver, basic auth): make venv EXTRAS=team, or pip install 'retrain[team]'"
mkdir -p "$TEAM_DIR/artifacts" "$TEAM_DIR/run"
DATA="$TEAM_DIR/pgdata"
if [ "$(id -u)" = 0 ]; then
    chown postgres: "$TEAM_DIR/run"
    runuser -u postgres -- test -x "$TEAM_DIR" || die "the postgres user cannot enter $TEAM_DIR; pick a TEAM_DIR outside /root"
    [ -d "$DATA" ] || { mkdir -p "$DATA"; chown postgres: "$DATA"; }
fi

# The cluster is made once. Trust authentication: PostgreSQL listens on loopback only, so only
# accounts on this host reach it (run the stack on a host only its admins log into); the door the
# team reaches is MLflow's, which AUTH=1 locks.
if [ ! -f "$DATA/PG_VERSION" ]; then
    as_pg "$BIN/initdb" -D "$DATA" -U "$DB_USER" --auth=trust -E UTF8 >"$TEAM_DIR/initdb.log"
fi
as_pg "$BIN/pg_ctl" start -D "$DATA" -l "$TEAM_DIR/run/postgres.log" -w -t 60 \
    -o "-p $PGPORT -k $TEAM_DIR/run -c listen_addresses=127.0.0.1" >/dev/null \
    || die "PostgreSQL did not start; see $TEAM_DIR/run/postgres.log"
stop_postgres() { as_pg "$BIN/pg_ctl" stop -D "$DATA" -m fast -w >/dev/null 2>&1 || true; }
trap stop_postgres EXIT

psql_q() { "$BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U "$DB_USER" -d postgres -tAc "$1"; }
for db in "$DB" "${DB}_auth"; do  # created if needed: a restart keeps the team's runs
    found=$(psql_q "SELECT 1 FROM pg_database WHERE datname = '$db'") || die "cannot query PostgreSQL on port $PGPORT"
    [ "$found" = 1 ] || psql_q "CREATE DATABASE \"$db\"" >/dev/null
done
BACKEND="postgresql+psycopg://$DB_USER@127.0.0.1:$PGPORT/$DB"

args=(server --host "$HOST" --port "$PORT" --workers "$WORKERS" --backend-store-uri "$BACKEND"
      --serve-artifacts --artifacts-destination "$TEAM_DIR/artifacts")
if [ "$HOST" != 127.0.0.1 ] && [ "$HOST" != localhost ]; then
    args+=(--allowed-hosts "${ALLOWED_HOSTS:-*}")  # MLflow 3 answers only localhost's Host header unless told
fi
if [ "${AUTH:-0}" = 1 ]; then
    cat >"$TEAM_DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = ${AUTH_DEFAULT_PERMISSION:-EDIT}
database_uri = postgresql+psycopg://$DB_USER@127.0.0.1:$PGPORT/${DB}_auth
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
EOF
    export MLFLOW_AUTH_CONFIG_PATH="$TEAM_DIR/basic_auth.ini"
    # The auth app signs its CSRF tokens with a key every worker and restart must share: made once,
    # readable by this account only, never in the project.
    key_file="$TEAM_DIR/flask_secret_key"
    [ -s "$key_file" ] || (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$key_file")
    MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(cat "$key_file")}"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
    args+=(--app-name basic-auth)
fi

shown_host="$HOST"; [ "$HOST" = 0.0.0.0 ] && shown_host=$(hostname -f 2>/dev/null || hostname)
echo "team-server: PostgreSQL on 127.0.0.1:$PGPORT, runs in database '$DB', artifacts in $TEAM_DIR/artifacts"
echo "team-server: on each teammate's machine:"
echo "export MLFLOW_TRACKING_URI=http://$shown_host:$PORT"
[ "${AUTH:-0}" = 1 ] && echo "team-server: basic auth on; clients set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"

# In the background, not exec: the EXIT trap must outlive MLflow to stop PostgreSQL after it. Its
# own process group (set -m), so a stop reaches the web server workers MLflow starts too.
set -m
"$MLFLOW" "${args[@]}" &
mlflow_pid=$!
set +m
trap 'kill -TERM -- "-$mlflow_pid" 2>/dev/null || true' INT TERM
wait "$mlflow_pid" || true
wait "$mlflow_pid" 2>/dev/null || true
