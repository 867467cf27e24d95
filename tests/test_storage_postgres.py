"""The queue SQL (infra/supabase/001_products_queue.sql) on a real, throwaway PostgreSQL cluster:
concurrent claims, dead workers' leases, the attempts limit, a seed-shaped table, and the
Supabase policies (002) against a stub of Supabase's roles and storage schema."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from tests.pg_cluster import POLICIES_SQL, QUEUE_SQL, Cluster, install_supabase_stubs, new_database, pg_cluster, pg_db  # noqa: F401

psycopg = pytest.importorskip("psycopg", reason='pip install "psycopg[binary]"')
from psycopg.rows import dict_row  # noqa: E402


def connect(dsn: str):
    return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)


def enqueue(conn, n: int, prefix: str = "p") -> list[str]:
    ids = [f"{prefix}{i:04d}" for i in range(n)]
    with conn.cursor() as cur:
        cur.executemany(
            "SELECT public.enqueue_product(uid => %s, title => %s, category => 'others', video_link => %s)",
            [(u, f"title {u}", f"videos/{u}/v.mp4") for u in ids],
        )
    return ids


def claim(conn, worker: str, lease: str = "10 minutes", max_attempts: int = 3) -> dict | None:
    return conn.execute(
        "SELECT * FROM public.claim_next_product(worker => %s, lease => %s::interval, max_attempts => %s)",
        (worker, lease, max_attempts),
    ).fetchone()


def test_eight_workers_claim_500_products_each_exactly_once(pg_db: str) -> None:
    with connect(pg_db) as conn:
        ids = enqueue(conn, 500)
    claims: list[tuple[str, str]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(name: str) -> None:
        try:
            with connect(pg_db) as conn:
                start.wait()
                while (row := claim(conn, name)) is not None:
                    with lock:
                        claims.append((row["unique_id"], name))
                    conn.execute(
                        "SELECT public.mark_product_done(uid => %s, manifest => %s)",
                        (row["unique_id"], f"models/{row['unique_id']}/manifest.json"),
                    )
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    counts = Counter(uid for uid, _ in claims)
    assert sorted(counts) == ids and set(counts.values()) == {1}, "a product was claimed twice or never"
    assert len({w for _, w in claims}) > 1, "only one worker ever got work: claims are serialised"
    with connect(pg_db) as conn:
        rows = conn.execute("SELECT status, attempts, count(*) AS n FROM products GROUP BY 1, 2").fetchall()
    assert rows == [{"status": "DONE", "attempts": 1, "n": 500}]
    assert time.monotonic() - t0 < 30


def test_a_dead_workers_row_returns_only_after_its_lease(pg_db: str) -> None:
    with connect(pg_db) as conn:
        enqueue(conn, 1, "mug")
        first = claim(conn, "dies", lease="1.5 seconds")
        assert first["unique_id"] == "mug0000" and first["attempts"] == 1
        # The worker dies here: it never marks the row. Others find nothing while the lease runs.
        assert claim(conn, "w2") is None
        time.sleep(0.5)
        assert claim(conn, "w2") is None
        row = conn.execute("SELECT status, claimed_by FROM products WHERE unique_id = 'mug0000'").fetchone()
        assert row == {"status": "PROCESSING", "claimed_by": "dies"}
        deadline = time.monotonic() + 5
        while (again := claim(conn, "w2")) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert again is not None and again["unique_id"] == "mug0000"
        assert again["claimed_by"] == "w2" and again["attempts"] == 2 and again["status"] == "PROCESSING"
        assert claim(conn, "w3") is None  # w2's lease is live


def test_attempts_stop_at_the_limit_and_the_row_fails_with_a_reason(pg_db: str) -> None:
    with connect(pg_db) as conn:
        enqueue(conn, 1, "cup")
        enqueue(conn, 1, "later")
        for n in (1, 2, 3):  # three workers die at once (their leases are already over)
            row = claim(conn, f"w{n}", lease="-1 second", max_attempts=3)
            assert row["unique_id"] == "cup0000" and row["attempts"] == n
        nxt = claim(conn, "w4", max_attempts=3)
        assert nxt["unique_id"] == "later0000"  # cup0000 was skipped and failed, not claimed a 4th time
        cup = conn.execute("SELECT * FROM products WHERE unique_id = 'cup0000'").fetchone()
        assert cup["status"] == "FAILED" and cup["attempts"] == 3
        assert "gave up after 3 attempts" in cup["error"] and "lease of w3 ran out" in cup["error"]
        assert claim(conn, "w5", max_attempts=3) is None


def test_failed_and_done_rows_are_never_claimed_and_errors_are_clear(pg_db: str) -> None:
    with connect(pg_db) as conn:
        enqueue(conn, 3, "x")
        conn.execute("SELECT public.mark_product_failed(uid => 'x0000', reason => 'frames: unreadable video')")
        conn.execute("SELECT public.mark_product_done(uid => 'x0001', manifest => 'models/x0001/manifest.json')")
        assert claim(conn, "w")["unique_id"] == "x0002"
        assert claim(conn, "w") is None
        failed = conn.execute("SELECT status, error FROM products WHERE unique_id = 'x0000'").fetchone()
        assert failed == {"status": "FAILED", "error": "frames: unreadable video"}
        with pytest.raises(psycopg.errors.NoDataFound, match="no product with unique_id 'nope'"):
            conn.execute("SELECT public.mark_product_done(uid => 'nope', manifest => 'm')")
        with pytest.raises(psycopg.errors.LockNotAvailable, match="being processed by w"):
            conn.execute("SELECT public.claim_product(uid => 'x0002', worker => 'other', lease => '1 minute')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="max_attempts"):
            claim(conn, "w", max_attempts=0)
        # Re-enqueueing puts a product back with fresh attempts.
        conn.execute("SELECT public.enqueue_product('x0000', 't', 'cup', 'videos/x0000/new.mp4')")
        back = conn.execute("SELECT status, attempts, error FROM products WHERE unique_id = 'x0000'").fetchone()
        assert back == {"status": "IDLE", "attempts": 0, "error": None}


def test_migration_upgrades_a_seed_table_and_is_idempotent(pg_cluster: Cluster) -> None:  # noqa: F811
    with connect(pg_cluster.dsn()) as conn:
        conn.execute("CREATE DATABASE seed_shaped")
    dsn = pg_cluster.dsn("seed_shaped")
    with connect(dsn) as conn:
        conn.execute(
            "CREATE TABLE products (id bigserial PRIMARY KEY, title text, category text, price float8, "
            "video_link text, image_link text, status text, unique_id text)"
        )
        conn.execute(
            "INSERT INTO products (title, category, price, video_link, image_link, status, unique_id) VALUES "
            "('mug', 'cup', 9.5, 'public/mug.mp4', 'public/mug.jpg', 'IDLE', 'seed-1'), "
            "('vase', 'vase', 20, 'public/vase.mp4', NULL, 'PROCESSING', 'seed-2'), "
            "('done', 'others', 1, 'public/d.mp4', NULL, 'DONE', 'seed-3')"
        )
    for _ in range(2):  # with psql, exactly as the README says, twice
        out = pg_cluster.psql("seed_shaped", "-f", str(QUEUE_SQL))
        assert out.returncode == 0, out.stderr
    with connect(dsn) as conn:
        rows = {r["unique_id"]: r for r in conn.execute("SELECT * FROM products").fetchall()}
        assert rows["seed-1"]["price"] == 9.5 and rows["seed-1"]["image_link"] == "public/mug.jpg"
        assert rows["seed-2"]["lease_until"] is not None  # the seed's lease-less claim gets a grace hour
        assert claim(conn, "w")["unique_id"] == "seed-1"
        assert claim(conn, "w") is None  # seed-2 is in its grace hour, seed-3 is DONE
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE products SET status = 'WHATEVER' WHERE unique_id = 'seed-3'")


def test_migration_refuses_a_uuid_unique_id_with_a_fix(pg_cluster: Cluster) -> None:  # noqa: F811
    with connect(pg_cluster.dsn()) as conn:
        conn.execute("CREATE DATABASE seed_uuid")
    with connect(pg_cluster.dsn("seed_uuid")) as conn:
        conn.execute("CREATE TABLE products (id serial PRIMARY KEY, unique_id uuid, title text, status text)")
    out = pg_cluster.psql("seed_uuid", "-f", str(QUEUE_SQL), check=False)
    assert out.returncode != 0
    assert "unique_id is uuid, KoroKoro needs text" in out.stderr and "ALTER COLUMN unique_id TYPE text" in out.stderr


def test_supabase_policies_refuse_plain_postgres(pg_db: str, pg_cluster: Cluster) -> None:  # noqa: F811
    dbname = pg_db.rsplit("dbname=", 1)[1]
    out = pg_cluster.psql(dbname, "-f", str(POLICIES_SQL), check=False)
    assert out.returncode != 0 and "needs a Supabase database" in out.stderr


def test_supabase_policies_on_a_stub_of_supabase(pg_db: str, pg_cluster: Cluster) -> None:  # noqa: F811
    """002 against stand-ins for Supabase's roles and storage schema (tests/pg_cluster.py): anon
    reads DONE rows and DONE models only, writes nothing, cannot run the queue."""
    install_supabase_stubs(pg_db)
    dbname = pg_db.rsplit("dbname=", 1)[1]
    for _ in range(2):
        out = pg_cluster.psql(dbname, "-f", str(POLICIES_SQL), check=False)
        assert out.returncode == 0, out.stderr
    with connect(pg_db) as conn:
        enqueue(conn, 2, "q")
        conn.execute("SELECT public.mark_product_done('q0000', 'models/q0000/manifest.json')")
        conn.execute(
            "INSERT INTO storage.objects (bucket_id, name) VALUES "
            "('korokoro_bucket', 'models/q0000/manifest.json'), ('korokoro_bucket', 'models/q0001/manifest.json'), "
            "('korokoro_bucket', 'videos/q0000/v.mp4')"
        )
        assert conn.execute("SELECT public FROM storage.buckets WHERE id = 'korokoro_bucket'").fetchone() == {"public": False}
        conn.execute("SET ROLE anon")
        assert [r["unique_id"] for r in conn.execute("SELECT unique_id FROM products").fetchall()] == ["q0000"]
        visible = [r["name"] for r in conn.execute("SELECT name FROM storage.objects ORDER BY name").fetchall()]
        assert visible == ["models/q0000/manifest.json"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE products SET status = 'IDLE' WHERE unique_id = 'q0000'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            claim(conn, "anon-worker")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO storage.objects (bucket_id, name) VALUES ('korokoro_bucket', 'models/q0001/x')")
        conn.execute("RESET ROLE")
        conn.execute("SET ROLE service_role")
        assert claim(conn, "service-worker")["unique_id"] == "q0001"
        assert len(conn.execute("SELECT name FROM storage.objects").fetchall()) == 3
        conn.execute("RESET ROLE")


def test_storage_postgres_opens_from_conf_and_environment(pg_db: str, tmp_path, monkeypatch) -> None:
    """`storage=postgres` as a worker subprocess opens it: the composed conf + KOROKORO_PG_DSN."""
    import pickle

    from flows.config import compose_config
    from tasks.storage import StoreError, open_store

    monkeypatch.setenv("KOROKORO_DATA", str(tmp_path / "data"))
    cfg = compose_config(["storage=postgres"])
    assert cfg["storage"]["backend"] == "postgres"
    monkeypatch.delenv("KOROKORO_PG_DSN", raising=False)
    with pytest.raises(StoreError, match="needs KOROKORO_PG_DSN in the environment"):
        open_store(cfg["storage"])
    monkeypatch.setenv("KOROKORO_PG_DSN", pg_db)
    store = open_store(cfg["storage"])
    (video := tmp_path / "v.mp4").write_bytes(b"video bytes")
    assert store.enqueue("mug", "cup", video, "pg-1").status == "IDLE"
    assert store.claim_next("w", 60, 3).unique_id == "pg-1"
    assert pg_db not in repr(store) and pg_db.encode() not in pickle.dumps(store)
    assert pickle.loads(pickle.dumps(store)).get("pg-1").status == "PROCESSING"


def test_postgres_errors_never_show_the_dsn_or_its_password(tmp_path, monkeypatch) -> None:
    from tasks.storage import StoreError, open_store

    secret = "s3cretPassw0rdDONOTLEAK"
    monkeypatch.setenv("KOROKORO_PG_DSN", f"postgresql://korokoro:{secret}@127.0.0.1:9/nodb?connect_timeout=2")
    store = open_store({"backend": "postgres", "root": str(tmp_path / "store"), "retry": {"attempts": 2, "base_delay_s": 0}})
    with pytest.raises(StoreError) as info:
        store.get("p1")
    text = "".join(__import__("traceback").format_exception(info.value))
    # A refused connection is transient: retried, then reported with the attempts.
    assert "get failed" in text and "gave up after 2 attempts" in text
    assert secret not in text and info.value.__cause__ is None and info.value.__context__ is None
