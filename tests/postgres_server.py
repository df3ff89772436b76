"""A real PostgreSQL server for tests: Debian's binaries (initdb, pg_ctl) in a temp dir, on loopback only.

PostgreSQL refuses to run as root, so as root the cluster belongs to `nobody` and every server command runs
through `runuser -u nobody`; as anyone else it runs as that user. Trust authentication, and it listens only on
the addresses given (127.0.0.1 by default) and a socket dir inside its temp dir: nothing outside can reach it.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
from psycopg import sql

__all__ = ["PostgresServer", "postgres_bindir"]

USER = "nobody"


def postgres_bindir() -> Path | None:
    """Where initdb/pg_ctl are: `pg_config --bindir` when it has them, else /usr/lib/postgresql/<newest>/bin."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                           key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                                           else 0, reverse=True)]
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file() and (c / "postgres").is_file():
            return c
    return None


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, hosts: Sequence[str] = ("127.0.0.1",), port: int | None = None,
                 wrap: Sequence[str] = (), hba: Sequence[str] = ()) -> None:
        """`wrap`: a command prefix for the server (e.g. `ip netns exec NS`); `hba`: extra networks to trust."""
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: run the README's test command (apt-get install "
                               "postgresql)")
        self.bin = bindir
        self.hosts, self.wrap, self.hba = tuple(hosts), list(wrap), tuple(hba)
        self._chosen_port = port is None  # a free port picked here: another may take it first (start retries)
        self._served = False  # started once: its URLs are out, its port stays
        self.port = port or free_port(self.hosts[0])
        self.root = Path(tempfile.mkdtemp(prefix="sowa-pg-"))
        self.data, self.sockets, self.log = self.root / "data", self.root / "sockets", self.root / "server.log"
        self.sockets.mkdir()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.root, USER)
            shutil.chown(self.sockets, USER)
        self.superuser = "sowa"

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [*self.wrap, *(["runuser", "-u", USER, "--"] if self._as_root else []), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if check and out.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}): {out.stderr[-2000:]}{log}")
        return out

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.superuser, "--auth=trust",
                      "-E", "UTF8", "--no-sync")
            # fsync off: safe against a server crash (the OS keeps its cache), not a host crash; commits stay
            # synchronous, so a test's kill -9 loses nothing that was acknowledged
            conf = [f"listen_addresses = '{','.join(self.hosts)}'", f"port = {self.port}",
                    f"unix_socket_directories = '{self.sockets}'", "fsync = off",
                    "full_page_writes = off", "shared_buffers = 32MB", "max_connections = 200",
                    "log_min_messages = warning"]
            with (self.data / "postgresql.conf").open("a") as f:
                f.write("\n".join(conf) + "\n")
            with (self.data / "pg_hba.conf").open("a") as f:
                f.writelines(f"host all all {net} trust\n" for net in self.hba)
        for attempt in range(5):
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                          "start")
                self._served = True
                return self
            except RuntimeError as e:
                # the free port was taken between free_port() and the server's bind (other tests, other xdist
                # workers, other users of the machine pick free ports too): another one, unless it was given or
                # clients already know this one (a restart)
                if not (self._chosen_port and not self._served and attempt < 4 and "already in use" in str(e)):
                    raise
                self.port = free_port(self.hosts[0])
                with (self.data / "postgresql.conf").open("a") as f:
                    f.write(f"port = {self.port}\n")  # the last setting of a name wins
        raise AssertionError("unreachable")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                      check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster: a crash, recovered from on the next start."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # its backends notice the postmaster is gone and exit

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str = "postgres", host: str | None = None) -> str:
        return f"postgresql://{self.superuser}@{host or self.hosts[0]}:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database; its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
