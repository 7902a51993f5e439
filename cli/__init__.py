"""Command-line interface: the only place that reads argv/env and configures logging."""
