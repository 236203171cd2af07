"""FlashMesh: software-defined NVMe-oF storage for AI clusters on Kubernetes."""

__version__ = "0.1.0"
