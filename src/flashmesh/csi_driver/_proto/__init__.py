"""Stubs generated from the vendored CSI v1.12.0 csi.proto (`make proto`; a test checks
that the committed files are what the generator makes). Never edit them by hand."""
