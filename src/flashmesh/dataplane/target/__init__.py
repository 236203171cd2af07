"""The NVMe-oF target side: nvmet's configfs as a typed model, a pure planner from observed
to desired state, and a writer that applies the plan under a configfs root."""
