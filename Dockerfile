# syntax=docker/dockerfile:1
#
# The one FlashMesh image: `flashmesh operator | csi | agent`, as charts/flashmesh deploys it.
#
# NOT BUILT OR TESTED HERE: the development machine has no container engine (no Docker,
# no buildah), so this file has never been built. The chart is tested against a real
# kube-apiserver (tests/test_helm_chart.py), where pods are never run from this image.
#
#   docker build -t REGISTRY/flashmesh:0.1.0 .   then   helm install ... \
#     --set image.repository=REGISTRY/flashmesh --set image.tag=0.1.0
#
# Debian 12's own python3 (3.11) in both stages: pyverbs exists only as Debian's
# python3-pyverbs, so the final virtualenv sees the system site-packages (as .venv does on
# the development machine, see scripts/setup.sh), and the wheels built in the first stage
# match the interpreter of the second.

ARG DEBIAN_IMAGE=debian:bookworm-slim

# --- 1. wheels: FlashMesh's own and every dependency's --------------------------------------
FROM ${DEBIAN_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN /opt/build/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/build/bin/pip wheel --no-cache-dir --wheel-dir /wheels .

# --- 2. runtime: the data path's userland and a virtualenv ---------------------------------
FROM ${DEBIAN_IMAGE}
# nvme-cli: nvme connect / disconnect (the node plugin). lvm2 (with dmsetup) and
# thin-provisioning-tools: volume groups, thin pools, segments (the agent). mdadm and
# dmsetup: mirrors and stripes (the node plugin). e2fsprogs, xfsprogs: mkfs and growing.
# kmod: modprobe nvmet / nvme-tcp / nvme-rdma. rdma-core, ibverbs-providers, ibverbs-utils,
# python3-pyverbs: RDMA devices and port state (RoCE and InfiniBand).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
      nvme-cli lvm2 thin-provisioning-tools mdadm e2fsprogs xfsprogs kmod \
      rdma-core ibverbs-providers ibverbs-utils python3-pyverbs \
 && rm -rf /var/lib/apt/lists/*
# LVM inside a container: no udev runs there, so LVM neither waits for udev nor relies on
# its rules (it makes the /dev nodes itself), lists devices without udev's database, and
# starts no dmeventd monitoring. lvmlocal.conf is read after lvm.conf and overrides it.
RUN printf '%s\n' \
      '' \
      '# FlashMesh: LVM in a container (no udev, no dmeventd)' \
      'devices {' \
      '    obtain_device_list_from_udev = 0' \
      '}' \
      'activation {' \
      '    udev_sync = 0' \
      '    udev_rules = 0' \
      '    monitoring = 0' \
      '}' >> /etc/lvm/lvmlocal.conf \
 && test "$(lvmconfig activation/udev_sync activation/udev_rules 2>/dev/null | tr '\n' ' ')" \
      = "udev_sync=0 udev_rules=0 "
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv --system-site-packages /opt/flashmesh \
 && /opt/flashmesh/bin/pip install --no-cache-dir --no-index --find-links /wheels flashmesh \
 && /opt/flashmesh/bin/python -c "import flashmesh.cli, pyverbs"
# Non-root by default: the operator and the CSI controller run as this user; the chart
# runs the agent and the node plugin as root and privileged (securityContext runAsUser 0).
RUN groupadd --system --gid 10001 flashmesh \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin flashmesh
ENV PATH=/opt/flashmesh/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["flashmesh"]
CMD ["--help"]
