"""Long commands a test session starts before the tests that read them need them, so that they run side by side
(on 2 CPU cores, one command that keeps one core busy leaves the other idle), each command and its checks
unchanged. Output goes to files, not pipes: a pipe nobody reads yet would stop a chatty command. `finish` and
`stop_all` serve the short, quiet commands that tests start side by side with pipes (subprocess.Popen)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def finish(proc: subprocess.Popen, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for a started process (giving it `stdin`), as subprocess.run would return it; one still running
    `timeout` seconds from now is killed and returned as it ended."""
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stop_all(procs) -> None:
    """Kill the started processes still running (a fixture's teardown: tests that never read theirs)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


class Job:
    """`cmd` started now; `result()` waits for it (at most `timeout` seconds from the start; a command still
    running then is killed, and its result says so) and returns it as subprocess.run would."""

    def __init__(self, cmd: list[str], *, cwd, env: dict, workdir: Path, timeout: float, nice: int = 0):
        self.cmd, self.timeout = [str(c) for c in cmd], timeout
        workdir.mkdir(parents=True, exist_ok=True)
        self._files = [open(workdir / name, "w+", encoding="utf-8") for name in ("stdout.txt", "stderr.txt")]
        self._start = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._files[0],
                                     stderr=self._files[1], text=True,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self._result: subprocess.CompletedProcess | None = None

    def result(self) -> subprocess.CompletedProcess:
        if self._result is None:
            note = ""
            try:
                self.proc.wait(timeout=max(1.0, self.timeout - (time.monotonic() - self._start)))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                note = f"\n(killed: still running {self.timeout:.0f} s after it started)"
            out, err = (f.seek(0) or f.read() for f in self._files)
            for f in self._files:
                f.close()
            self._result = subprocess.CompletedProcess(self.cmd, self.proc.returncode, out, err + note)
        return self._result

    def stop(self) -> None:
        """Kill it if it still runs (a session that ended before reading it)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in self._files:
            f.close()
