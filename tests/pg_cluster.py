"""A throwaway PostgreSQL cluster for tests: Debian's server binaries, a temp dir, a unix socket.

``pg_cluster`` (session) starts one cluster with ``initdb`` + ``pg_ctl`` (as ``nobody`` when the
tests run as root: postgres refuses to run as root), listening only on a socket in its own temp
dir, with durability off for speed. ``pg_db`` (per test) is a fresh database cloned from a
template that already holds ``infra/supabase/001_products_queue.sql``.

Skips with what to install when the binaries or psycopg are missing:
``apt-get install postgresql`` and ``pip install "psycopg[binary]"``.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
MIGRATIONS = REPO / "infra" / "supabase"
QUEUE_SQL = MIGRATIONS / "001_products_queue.sql"
POLICIES_SQL = MIGRATIONS / "002_supabase_policies.sql"
_TEMPLATE = "korokoro_template"
_counter = itertools.count()


def find_pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb (or ``$KOROKORO_PG_BIN``)."""
    if env := os.environ.get("KOROKORO_PG_BIN"):
        return Path(env) if (Path(env) / "initdb").is_file() else None
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


@dataclass
class Cluster:
    bin: Path
    data: Path
    socket_dir: Path
    port: int
    user: str = "postgres"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} user={self.user} dbname={dbname}"

    def psql(self, dbname: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the cluster's psql (as root is fine: the socket trusts every local user)."""
        cmd = [str(self.bin / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(dbname), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """Prefix ``cmd`` so it runs as ``nobody`` when we are root (postgres will not run as root)."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "nobody", "--", *cmd]
    return ["su", "-s", "/bin/sh", "nobody", "-c", " ".join(cmd)]


def start_cluster() -> tuple[Cluster | None, str]:
    """Start a cluster; return it, or None and the reason it could not start."""
    pg_bin = find_pg_bin()
    if pg_bin is None:
        return None, "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: apt-get install postgresql"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, 'psycopg is not installed: pip install "psycopg[binary]"'
    root = Path(tempfile.mkdtemp(prefix="korokoro-pg-", dir="/tmp"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        import pwd

        nobody = pwd.getpwnam("nobody")
        for p in (root, sock):
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    port = 50000 + os.getpid() % 10000  # only names the socket file; nothing listens on TCP
    try:
        subprocess.run(
            _as_postgres_user([str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                               "-E", "UTF8", "--no-sync", "--no-instructions"]),
            check=True, capture_output=True, text=True, timeout=120, env=env, cwd="/",
        )
        opts = (f"-c listen_addresses='' -c unix_socket_directories={sock} -c port={port} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=60 "
                "-c shared_buffers=64MB")
        subprocess.run(
            _as_postgres_user([str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"),
                               "-o", opts, "-w", "-t", "60", "start"]),
            check=True, capture_output=True, text=True, timeout=90, env=env, cwd="/",
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        log = root / "server.log"
        if log.exists():
            detail += "\n" + log.read_text()[-2000:]
        shutil.rmtree(root, ignore_errors=True)
        return None, f"could not start a throwaway PostgreSQL cluster with {pg_bin}: {detail.strip()[-2000:]}"
    return Cluster(bin=pg_bin, data=data, socket_dir=sock, port=port), ""


def stop_cluster(cluster: Cluster) -> None:
    subprocess.run(
        _as_postgres_user([str(cluster.bin / "pg_ctl"), "-D", str(cluster.data), "-m", "immediate", "-w", "stop"]),
        capture_output=True, timeout=60, cwd="/",
    )
    shutil.rmtree(cluster.data.parent, ignore_errors=True)


def apply_sql(dsn: str, path: Path) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(path.read_text())


def install_supabase_stubs(dsn: str) -> None:
    """A *stub* of the parts of Supabase that 002 needs (roles anon/authenticated/service_role,
    storage.buckets, storage.objects, storage.foldername), shaped like Supabase's own, so the
    policies can be applied and exercised on plain PostgreSQL. Not Supabase itself."""
    import psycopg

    sql = """
    DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN CREATE ROLE anon NOLOGIN; END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN CREATE ROLE authenticated NOLOGIN; END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN CREATE ROLE service_role NOLOGIN BYPASSRLS; END IF;
    END $$;
    CREATE SCHEMA IF NOT EXISTS storage;
    CREATE TABLE IF NOT EXISTS storage.buckets (
        id text PRIMARY KEY, name text NOT NULL, owner uuid, public boolean DEFAULT false,
        created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now(),
        file_size_limit bigint, allowed_mime_types text[]);
    CREATE TABLE IF NOT EXISTS storage.objects (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(), bucket_id text REFERENCES storage.buckets (id),
        name text, owner uuid, created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now(),
        last_accessed_at timestamptz DEFAULT now(), metadata jsonb, version text, user_metadata jsonb,
        UNIQUE (bucket_id, name));
    CREATE OR REPLACE FUNCTION storage.foldername(name text) RETURNS text[] LANGUAGE plpgsql AS $f$
    DECLARE _parts text[];
    BEGIN
        SELECT string_to_array(name, '/') INTO _parts;
        RETURN _parts[1:array_length(_parts, 1) - 1];
    END $f$;
    ALTER TABLE storage.objects ENABLE ROW LEVEL SECURITY;
    GRANT USAGE ON SCHEMA storage TO anon, authenticated, service_role;
    GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
    GRANT SELECT ON storage.buckets TO anon, authenticated;
    GRANT ALL ON storage.objects, storage.buckets TO service_role;
    GRANT SELECT ON storage.objects TO anon, authenticated;
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


_cluster_state: dict[str, object] = {}


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    cluster, why = start_cluster()
    if cluster is None:
        pytest.skip(why)
    try:
        import psycopg

        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {_TEMPLATE}")
        apply_sql(cluster.dsn(_TEMPLATE), QUEUE_SQL)
        yield cluster
    finally:
        stop_cluster(cluster)


def new_database(cluster: Cluster) -> str:
    """A fresh database with 001 applied; returns its DSN."""
    import psycopg

    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {_TEMPLATE}")
    return cluster.dsn(name)


@pytest.fixture
def pg_db(pg_cluster: Cluster) -> str:
    """DSN of a fresh database holding the queue migration."""
    return new_database(pg_cluster)
