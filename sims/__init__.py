"""ServerApp, run configuration, simulation launcher and benchmark drivers."""
