"""Runs inside a storage VM: agent passes that each SIGKILL themselves just before their
Nth change to the node, or before the first change CHANGES names (FLASHMESH_CRASH_AT).
Each pass is a forked child of this process, which imports FlashMesh once (an import takes
many seconds under emulation); the child is a whole agent process that dies by SIGKILL, as
a crash would kill it. Prints each pass's exit code as JSON (-9: killed at its crash
point).

    python crash_passes.py NODE ADDRESS KUBECONFIG CHANGES COUNT
"""

from __future__ import annotations

import json
import logging
import os
import sys

from flashmesh.dataplane import faults
from flashmesh.dataplane.agent import Agent
from flashmesh.kube import Kube


def main(node: str, address: str, kubeconfig: str, changes: str, count: int) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    codes = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            os.environ[faults.ENV] = changes
            try:
                Agent(Kube.from_kubeconfig(kubeconfig), node, address).reconcile()
            except BaseException:
                logging.exception("pass failed")
                os._exit(1)
            os._exit(0)  # reached only by a pass that made fewer changes than asked
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    print(json.dumps(codes))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
