"""bluegreen: zero-downtime blue-green deployments on one host, built from systemd's parts."""

__version__ = "0.1.0"
