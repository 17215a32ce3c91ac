"""The real server for the serve tests: python -m rgpt.serve in a subprocess, on a free loopback port."""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

BANNER = re.compile(r"rgpt serve: (\S+) \(.*\) at (http://127\.0\.0\.1:\d+)/")


class Server:
    """python -m rgpt.serve args… bound to 127.0.0.1 on a port the system picks (port=0); its address is
    read from the line it prints once listening (`env`: more environment variables). stop() sends Ctrl-C
    and returns (exit code, stderr)."""

    def __init__(self, *args, cwd, threads=1, timeout=90.0, env=None, ignore_sigint=False):  # tiny: 1 thread
        inherited = {k: v for k, v in os.environ.items() if k != "RGPT_API_KEY"}  # a key only when asked for
        env = {**inherited, "OMP_NUM_THREADS": str(threads), "PYTHONIOENCODING": "utf-8", **(env or {})}
        command = [sys.executable, "-m", "rgpt.serve", "host=127.0.0.1", "port=0", "device=cpu"]
        command.append(f"threads={threads}")
        self.proc = subprocess.Popen(
            [*command, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            # as a background job of a script starts: SIGINT ignored
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()  # the pipe never fills, whatever is logged
        if not self.ready.wait(timeout) or self.proc.poll() is not None:
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        self.model, self.url = BANNER.search("".join(self.lines)).groups()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if BANNER.search(line):
                self.ready.set()
        self.ready.set()  # the process ended

    def decoder(self) -> int:
        """The pid of the server's decoding process (rgpt.inference.decoder), its one child."""
        found = children(self.proc.pid)
        assert len(found) == 1, found
        return found[0]

    def stop(self, timeout=20.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, "".join(self.lines)


def children(pid: int) -> list[int]:
    """The pids of a process's children (Linux /proc: those of each of its threads)."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]
