"""The CSI Identity service: the driver's name and version, what it offers, and readiness."""

from __future__ import annotations

from typing import Any

from flashmesh import __version__
from flashmesh.core.resources import CSI_DRIVER
from flashmesh.csi_driver._proto import csi_pb2, csi_pb2_grpc

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion


class Identity(csi_pb2_grpc.IdentityServicer):
    """The same answers in every mode: capabilities describe the plugin as a whole (a node
    plugin's callers, csi-sanity among them, learn from it that ControllerPublish exists)."""

    def GetPluginInfo(self, request: Any, context: Any) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=CSI_DRIVER, vendor_version=__version__)

    def GetPluginCapabilities(
        self, request: Any, context: Any
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = [
            csi_pb2.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)),
            csi_pb2.PluginCapability(
                service=Service(type=Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)
            ),
            csi_pb2.PluginCapability(service=Service(type=Service.CONTROLLER_SERVICE)),
        ]
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: Any, context: Any) -> csi_pb2.ProbeResponse:
        response = csi_pb2.ProbeResponse()
        response.ready.value = True
        return response
