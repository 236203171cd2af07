"""SIGTERM (a pod deleted, a DaemonSet rolled out) stops the agent only between passes: a
pass killed between two steps could leave a host unlinked but still connected."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# An agent whose pass gets SIGTERM half-way, with stand-ins for its watches (no API server
# is needed to see when it stops).
SCRIPT = textwrap.dedent(
    """
    import os, signal, threading
    from flashmesh.dataplane.agent import loop

    class Cache:
        def __init__(self, *args):
            self.wake = threading.Event()
        def start(self):
            pass

    loop.AgentCache = Cache
    loop.label_own_objects = lambda kube, node: None
    steps = []

    class Agent(loop.Agent):
        def reconcile(self):
            steps.append("unlink")
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("cut-off")
            return True

    agent = Agent(kube=None, node="storage-0", address="10.0.0.1")
    agent.stop_on_sigterm()
    agent.run_forever()
    print(" ".join(steps))
    """
)


def test_sigterm_lets_the_pass_under_way_finish_then_stops() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    # One pass, finished: the step after the signal ran, and no pass started after it.
    assert done.stdout.split() == ["unlink", "cut-off"], done.stdout
