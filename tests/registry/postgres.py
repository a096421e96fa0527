"""A private PostgreSQL server for the tests: started on a free port in a temporary directory,
or taken from REGISTRY_TEST_POSTGRES_URL (a server whose user may create databases)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.e2e.harness import free_port

USER_ENV = "REGISTRY_TEST_POSTGRES_URL"


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {name} is not installed: run scripts/test (which installs Debian's "
            f"postgresql package) or set {USER_ENV}"
        )
    return found


def _as_postgres() -> list[str]:
    # initdb and postgres refuse to run as root; Debian's package creates the postgres user.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@contextmanager
def postgres_server(settings: Sequence[str] = ()) -> Iterator[str]:
    """Yield an admin URL (without a database name) of a running server; ``settings`` are
    more ``name=value`` server settings (a private server only)."""
    if os.environ.get(USER_ENV):
        yield os.environ[USER_ENV].rstrip("/")
        return
    root = Path(tempfile.mkdtemp(prefix="registry-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    run = _as_postgres()
    subprocess.run(
        [
            *run,
            _binary("initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [
            *run,
            _binary("pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-t",
            "60",
            "-l",
            str(root / "log"),
            "-o",
            " ".join(
                [f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"]
                + [f"-c {setting}" for setting in settings]
            ),
            "start",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*run, _binary("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


def create_database(server: str, name: str) -> str:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(server + "/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


def seq_scans(url: str, tables: Sequence[str]) -> dict[str, int]:
    """Sequential scans so far of each of ``tables`` (an index that a query should use, used)."""
    import psycopg  # noqa: PLC0415 (PostgreSQL tests only)

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        rows = connection.execute(
            "SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname = ANY(%s)",
            (list(tables),),
        ).fetchall()
    return {name: count for name, count in rows}
