"""
A throwaway PostgreSQL server for tests and benchmarks: a fresh cluster in a temporary directory, listening on a free
port of 127.0.0.1, with one password-protected role and database, stopped and removed on exit.

The server binaries (``initdb``, ``pg_ctl``) are looked up on ``PATH``, then under ``/usr/lib/postgresql/*/bin``
(where Debian's ``postgresql`` package puts them, off ``PATH``). PostgreSQL refuses to run as root: as root, the
server runs as the ``postgres`` user the package creates.
"""

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SERVER_USER_FOR_ROOT = "postgres"
DEBIAN_BIN_DIRS = "/usr/lib/postgresql/*/bin"


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server can be started here (binaries, driver or unprivileged user missing)."""


def find_server_bin_dir() -> Path:
    """
    :return: the directory holding ``initdb`` and ``pg_ctl`` (the newest Debian version if several are installed)
    :raises ServerUnavailable: if there is none
    """
    on_path = [shutil.which(name) for name in ("initdb", "pg_ctl")]
    if all(on_path):
        return Path(on_path[0]).resolve().parent  # type: ignore[arg-type]
    candidates = [path for path in Path("/").glob(DEBIAN_BIN_DIRS.lstrip("/")) if (path / "pg_ctl").is_file()]
    if not candidates:
        raise ServerUnavailable(
            f"no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in {DEBIAN_BIN_DIRS}: "
            "install the server, e.g. `apt-get install postgresql`"
        )
    return max(candidates, key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else -1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgresql_server(database: str = "optuna", user: str = "optuna") -> Iterator[str]:
    """
    Start a throwaway PostgreSQL server and yield the URL of an empty database on it.

    :param database: name of the database created for ``user``
    :param user: the role that owns it (password generated)
    :return: (yields) ``postgresql://user:password@127.0.0.1:port/database``
    :raises ServerUnavailable: without server binaries, the ``psycopg`` driver, or (as root) a ``postgres`` user
    """
    try:
        import psycopg
        from psycopg import sql
    except ImportError as error:
        raise ServerUnavailable('the psycopg driver is not installed: pip install "sb3_trpo_kfac[tune]"') from error
    bin_dir = find_server_bin_dir()
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(SERVER_USER_FOR_ROOT)
        except KeyError as error:
            raise ServerUnavailable(
                f"PostgreSQL refuses to run as root and there is no {SERVER_USER_FOR_ROOT!r} user to run it as"
            ) from error
        run_as = ["runuser", "-u", SERVER_USER_FOR_ROOT, "--"]

    # Not pytest's tmp_path: as root that is private to root, and the server runs as another user.
    root = Path(tempfile.mkdtemp(prefix="sb3_trpo_kfac_pg_"))
    data, log = root / "data", root / "server.log"
    superuser_password, password = secrets.token_hex(16), secrets.token_hex(16)
    (root / "pwfile").write_text(superuser_password + "\n")
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
        os.chown(root / "pwfile", owner.pw_uid, owner.pw_gid)

    def run(*command: str) -> None:
        result = subprocess.run([*run_as, *command], cwd=root, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            output = f"{result.stdout}{result.stderr}{server_log}"
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{output}")

    started = False
    try:
        # Passwords on TCP (as a team's server would have), no fsync: the cluster lives for one test.
        run(
            str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={root / 'pwfile'}",
            "--auth=scram-sha-256", "--no-sync", "--encoding=UTF8", "--locale=C",
        )  # fmt: skip
        for attempt in range(3):  # another process may take the free port between the probe and the start
            port = _free_port()
            options = f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off"
            try:
                run(str(bin_dir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(data), "-l", str(log), "-o", options)
                started = True
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        # autocommit: CREATE DATABASE cannot run in a transaction
        with psycopg.connect(
            host="127.0.0.1", port=port, user="postgres", password=superuser_password, dbname="postgres", autocommit=True
        ) as connection:
            # Composed client-side: utility statements take no bound parameters.
            connection.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(user), sql.Literal(password))
            )
            connection.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(user)))
        yield f"postgresql://{user}:{password}@127.0.0.1:{port}/{database}"
    finally:
        try:
            if started:
                run(str(bin_dir / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data))
        finally:
            shutil.rmtree(root, ignore_errors=True)
