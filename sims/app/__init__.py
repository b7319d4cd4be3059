"""The ServerApp: the round loop, its checkpoints and its report (results.json, plot)."""
