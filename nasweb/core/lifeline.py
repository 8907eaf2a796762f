"""Exit when the process that started us is gone.

Test runs start real workers and web servers in their own sessions; if the test process is
killed (a timeout, Ctrl-C), those children must not live on and steal the next run's tasks.
A process started with NASWEB_EXIT_WITH_PARENT=<pid> watches that pid and exits when it dies.
"""

from __future__ import annotations

import os
import threading
import time

_started = False


def watch_parent_from_env(*, after_fork: bool = False) -> None:
    """Start the watcher thread (again after a fork: threads do not survive fork)."""
    global _started
    raw = os.environ.get("NASWEB_EXIT_WITH_PARENT")
    if (_started and not after_fork) or not raw:
        return
    parent = int(raw)
    _started = True

    def watch() -> None:
        while True:
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:
                pass  # it exists, owned by someone else
            time.sleep(1.0)

    threading.Thread(target=watch, name="nasweb-lifeline", daemon=True).start()
