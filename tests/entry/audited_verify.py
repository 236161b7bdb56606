"""Run ``python -m scoring ARGS`` in this fresh process and record what it opened and its peak memory.

    AUDIT_OUT=result.json python tests/entry/audited_verify.py verify BUNDLE --device cpu

An audit hook (PEP 578), installed before anything of ours is imported, records the path of every ``open`` and
every folder listing (``os.listdir`` / ``os.scandir``) of the whole run, imports included. At exit the file named
by ``AUDIT_OUT`` receives ``{"status", "opened", "peak_rss_kb", "seconds"}``. The peak is ``VmHWM`` of
/proc/self/status: the high-water mark of this process image. (``ru_maxrss`` is no measure here: Linux carries
it over ``execve`` from the forked parent, so a child of a large pytest process reports the parent's size.)
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

_opened: list[str] = []
_EVENTS = ("open", "os.listdir", "os.scandir")


def _record(event: str, args: tuple) -> None:
    if event in _EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.abspath(os.fsdecode(args[0])))


def main() -> None:
    sys.addaudithook(_record)
    start = time.perf_counter()
    from scoring.__main__ import main as scoring_main

    try:
        status = scoring_main(sys.argv[1:])
    except SystemExit as exit_:  # argparse
        status = exit_.code
    seconds, opened = time.perf_counter() - start, list(_opened)
    peak = re.search(r"^VmHWM:\s+(\d+) kB$", Path("/proc/self/status").read_text(), re.MULTILINE)
    result = {"status": status, "opened": opened, "seconds": seconds, "peak_rss_kb": int(peak.group(1))}
    with open(os.environ["AUDIT_OUT"], "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
