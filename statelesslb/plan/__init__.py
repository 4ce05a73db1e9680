"""The pure core: from a snapshot, the flows and groups this chassis needs."""
