"""`flashmesh operator`: kopf serving FlashMesh's handlers, standalone (one replica, no
peering objects) and cluster-wide, with its /metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import os

import kopf

from flashmesh import metrics
from flashmesh.operator.handlers import OperatorConfig, build_registry


def run(config: OperatorConfig, metrics_port: int | None, liveness: str | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # kopf says "succeeded" for every timer tick; its warnings and errors are what matter.
    logging.getLogger("kopf").setLevel(logging.WARNING)
    if config.kubeconfig:  # kopf's login reads $KUBECONFIG; this process is the operator's
        os.environ["KUBECONFIG"] = config.kubeconfig
    metrics.serve(metrics_port)
    registry = build_registry(config)
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=True,
            liveness_endpoint=liveness,
        )
    )
    return 0
