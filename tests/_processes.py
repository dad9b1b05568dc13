"""Helpers for tests that start several processes (jax.distributed on emulated CPU devices)."""

import socket
import subprocess


def free_port() -> int:
    """A TCP port on loopback that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(commands, *, env, timeout, cwd=None) -> list[str]:
    """Start every command at once, wait for all of them and return their outputs (stdout
    and stderr together); each must exit with status 0. Any still running is killed."""
    procs = [
        subprocess.Popen(
            [str(a) for a in command],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for command in commands
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
            assert proc.returncode == 0, out[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs
