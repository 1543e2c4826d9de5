"""Local ports and child processes, for the development tools, benchmarks and tests."""

from __future__ import annotations

import signal
import socket
import subprocess


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM (a gateway drains), then SIGKILL after ``timeout``; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
