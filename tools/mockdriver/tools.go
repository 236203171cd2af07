//go:build tools

// csi-test's mock driver: a CSI driver that does no storage work, the reference the
// provisioning benchmark compares FlashMesh with. csi-driver-host-path, the usual
// reference, is not served by the module proxy this project builds from.
package tools

import _ "github.com/kubernetes-csi/csi-test/v3/cmd/mock-driver"
