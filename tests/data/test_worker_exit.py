"""DataLoader workers end with their main process on every path: it returns, it raises, or a stop signal to
the whole process group (a scheduler's preemption) makes it exit."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

EXIT_SECONDS = 30  # an exit takes well under a second once the workers are loaded; a hang never ends

MAIN = textwrap.dedent("""
    import multiprocessing, signal, sys, time
    from data import build_loaders

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as the run does: a stop signal ends it cleanly
    # Module-level loaders keep their persistent workers alive until the interpreter's exit handlers run.
    loaders = build_loaders("digits", root=None, batch_size=64, eval_batch_size=64, augment=None, num_workers=2,
                            pin_memory=False, download=False, seed=0)
    next(iter(loaders.train))
    print(*(worker.pid for worker in multiprocessing.active_children()), flush=True)
    if sys.argv[1] == "raises":
        raise RuntimeError("the run failed")
    if sys.argv[1] == "is stopped":
        time.sleep(600)
""")


def _alive(pid: int) -> bool:
    """Running or stopped; False once it is gone or a zombie (dead, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how, status", [("returns", 0), ("raises", 1), ("is stopped", 0)])
def test_a_main_process_with_live_workers_ends_and_leaves_none(how, status):
    main = subprocess.Popen([sys.executable, "-c", MAIN, how], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in main.stdout.readline().split()]
        assert len(workers) == 2
        if how == "is stopped":
            os.killpg(main.pid, signal.SIGTERM)  # the main process and its workers, as a scheduler stops a job
        try:
            _, stderr = main.communicate(timeout=EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the main process that {how} was still running after {EXIT_SECONDS} s")
        assert main.returncode == status and "DataLoader worker" not in stderr, stderr
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers))
    finally:
        if main.poll() is None:
            os.killpg(main.pid, signal.SIGKILL)  # its workers die with it (PR_SET_PDEATHSIG)
            main.wait()
