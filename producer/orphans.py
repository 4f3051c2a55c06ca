"""Children that end with their parent: ``pixelrelay run``'s workers and embedded Redis must
not outlive a ``run`` killed by SIGKILL, the OOM killer or ``timeout -s KILL``.

``bound_to_parent(cmd, signum)`` wraps a command line in a tiny launcher (``python -I -c``)
that asks Linux for ``signum`` when the process that started it dies
(``prctl(PR_SET_PDEATHSIG)``, kept across ``exec``), sets umask 077 (everything the child
creates is the operator's alone), checks the parent is still there (it may have died before
the ``prctl``), then ``exec``s the command. The signal is sent when the *thread* that started
the child ends: start children from the thread that lives as long as they should. Elsewhere
than Linux the launcher only sets the umask.
"""

from __future__ import annotations

import os
import signal
import sys

_LAUNCHER = """\
import ctypes, os, signal, sys
os.umask(0o077)
if sys.platform == "linux":
    if ctypes.CDLL(None, use_errno=True).prctl(1, int(sys.argv[2]), 0, 0, 0) != 0:
        sys.exit("pixelrelay: prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(sys.argv[1]):
        sys.exit(1)
os.execv(sys.argv[3], sys.argv[3:])
"""


def bound_to_parent(cmd: list[str], signum: int = signal.SIGTERM) -> list[str]:
    """``cmd`` run so that it gets ``signum`` when this process dies (see the module docstring)."""
    return [sys.executable, "-I", "-c", _LAUNCHER, str(os.getpid()), str(int(signum)), *cmd]
