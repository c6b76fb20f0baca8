"""Kills engine process groups when the kernel that started them is gone.

Run as ``python -m vllm_notebook._watchdog``. The kernel writes ``+PGID`` or
``-PGID`` lines to our stdin; end of file (the kernel exited, even by SIGKILL)
means: terminate every process group still listed. Standard library only.
"""

import os
import signal
import sys
import time


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def main() -> None:
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] in "+-" and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        for pgid in [g for g in groups if _alive(g)]:
            try:
                os.killpg(pgid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(g) for g in groups):
            time.sleep(0.1)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    main()
