"""The CSI driver (csi.flashmesh.dev): identity, controller and node services."""
