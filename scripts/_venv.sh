# Sourced by scripts/*: create .venv and install the project (with EXTRAS) when it is missing or stale.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_heartbeat.sh"
VENV="$ROOT/.venv"
EXTRAS="${EXTRAS:-}"
stamp="$VENV/.installed${EXTRAS:+-$EXTRAS}"
need_postgres() {
  if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing PostgreSQL (Debian package postgresql)..." >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
      echo "PostgreSQL server binaries (initdb, pg_ctl) are missing: install the package 'postgresql'" >&2
      exit 1
    fi
  fi
}
need_postgres
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  python3 -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "installing migrator${EXTRAS:+[$EXTRAS]} and its dependencies into $VENV (pip)" >&2
  with_heartbeat "installing" "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT${EXTRAS:+[$EXTRAS]}" 2>&1 | grep --line-buffered -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import migrator, psycopg, sqlalchemy, alembic, click, tenacity, tqdm, yaml" 
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
