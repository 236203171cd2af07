"""Pure vocabulary and decisions: no I/O, no kopf, grpc, kubernetes or subprocess."""
