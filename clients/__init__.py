"""fedquant ClientApps."""
