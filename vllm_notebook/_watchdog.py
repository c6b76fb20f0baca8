"""Kills engine process groups when the kernel that started them is gone.

Run as ``python -m vllm_notebook._watchdog`` (``procs.guard`` starts it in a session of
its own). The kernel writes ``+PGID`` or ``-PGID`` lines to our stdin, and ``+DSINCE FOLDER`` or
``-DSINCE FOLDER`` for an engine's private folder; end of file (the kernel exited, even by SIGKILL) means:
terminate every process group still listed, then remove the folders listed and the ``/dev/shm`` segments
their engines left (``private.remove``).
"""

import signal
import sys

from vllm_notebook.private import remove
from vllm_notebook.procs import terminate_groups


def main() -> None:
    groups: set[int] = set()
    folders: dict[str, float] = {}
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line[:1] in "+-" and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
        elif line[:2] in ("+D", "-D") and " " in line:
            since, folder = line[2:].split(" ", 1)
            if line[0] == "+":
                folders[folder] = float(since)
            else:
                folders.pop(folder, None)
    terminate_groups(groups, grace=5.0)
    for folder, since in folders.items():
        remove(folder, since=since)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    main()
