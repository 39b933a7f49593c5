#!/usr/bin/env bash
# A team's MLflow tracking server: runs and the model registry in PostgreSQL, artifacts (models,
# plots) proxied by the server itself (--serve-artifacts) into ARTIFACTS_DIR, so workers on other
# machines need only this server's URL, no storage credentials. See README "Team deployment".
#
#   bash scripts/team-server.sh                      # 127.0.0.1:5000, database atari_vae_mlflow
#   HOST=0.0.0.0 ALLOWED_HOSTS=mlflow.lab:5000 bash scripts/team-server.sh   # other machines
#
# Settings (environment): HOST (127.0.0.1), PORT (5000), PG_URL (postgresql://postgres@127.0.0.1:5432),
# MLFLOW_DB (atari_vae_mlflow, created if missing), ARTIFACTS_DIR (./mlartifacts; an s3://
# bucket works too), WORKERS (2), ALLOWED_HOSTS (extra Host headers to accept, comma-separated).
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5000}
PG_URL=${PG_URL:-postgresql://postgres@127.0.0.1:5432}
MLFLOW_DB=${MLFLOW_DB:-atari_vae_mlflow}
ARTIFACTS_DIR=${ARTIFACTS_DIR:-$PWD/mlartifacts}
WORKERS=${WORKERS:-2}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
MLFLOW=${MLFLOW:-$(dirname "$PY")/mlflow}
export MLFLOW_DISABLE_TELEMETRY=true

if [[ ! "$MLFLOW_DB" =~ ^[a-z_][a-z0-9_]*$ ]]; then
  echo "Error: MLFLOW_DB must be a plain lower-case database name, got '$MLFLOW_DB'" >&2
  exit 1
fi
# SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the postgres extra installs psycopg2.
DB_URL="${PG_URL/#postgresql:/postgresql+psycopg2:}/$MLFLOW_DB"
"$PY" - "$PG_URL" "$MLFLOW_DB" <<'EOF'
import sys
import psycopg2
server, name = sys.argv[1], sys.argv[2]
try:
    conn = psycopg2.connect(f"{server}/postgres", connect_timeout=10)
except psycopg2.OperationalError as exc:
    sys.exit(f"Error: cannot reach PostgreSQL at {server}: {str(exc).strip().splitlines()[0]}")
conn.autocommit = True
with conn.cursor() as cur:
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    if cur.fetchone() is None:
        cur.execute(f'CREATE DATABASE "{name}"')
        print(f"created database {name}", file=sys.stderr)
EOF
[[ "$ARTIFACTS_DIR" == *://* ]] || mkdir -p "$ARTIFACTS_DIR"

allowed="127.0.0.1:$PORT,localhost:$PORT,$HOST:$PORT${ALLOWED_HOSTS:+,$ALLOWED_HOSTS}"
echo "MLflow tracking server on http://$HOST:$PORT (runs in $MLFLOW_DB, artifacts in $ARTIFACTS_DIR)" >&2
exec "$MLFLOW" server --host "$HOST" --port "$PORT" --workers "$WORKERS" \
  --backend-store-uri "$DB_URL" --serve-artifacts --artifacts-destination "$ARTIFACTS_DIR" \
  --allowed-hosts "$allowed"
