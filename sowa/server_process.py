"""Run the real server (`sowa serve`, uvicorn) as a subprocess on a free loopback port: for the integration
tests, the load benchmark and the demo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

__all__ = ["ServerProcess", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, bundle: Path, data_dir: Path, log: Path, flags: Sequence[str] = (),
                 env: dict[str, str] | None = None, device: str = "cpu", ready_timeout: float = 90.0) -> None:
        """`ready_timeout`: how long `with` waits for /readyz (start-up compiles with --compile take longer)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "sowa", "serve", "--bundle", str(bundle), "--data-dir",
                     str(data_dir), "--port", str(self.port), "--device", device, *flags]
        self.ready_timeout = ready_timeout
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float | None = None) -> ServerProcess:
        timeout = self.ready_timeout if timeout is None else timeout
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log_file, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=Path(__file__).resolve().parents[1])  # the checkout, for `-m sowa`
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log_file.close()
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()  # never leave a half-started server behind
        raise RuntimeError(f"server not ready after {timeout} s: {self.log.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def memory_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of the server process from /proc/PID/status, in KiB (VmHWM: its peak RSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def reset_peak_memory(self) -> None:
        """Reset VmHWM to the current RSS (Linux; the same user or root), so the next peak is the next request's."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flushing; what the registry promised must already be on disk."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log_file.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._log_file.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
