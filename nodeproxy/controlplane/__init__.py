"""The etcd side of the shared control plane: endpoints, client, config store, watch, fleet.

The config model (key layout, split, join, diff) is pure and lives in
:mod:`ztunnel_cfg.store_layout`; this package does the I/O with etcd through aetcd.
"""

import os

# gRPC's fork handlers can abort a child between fork() and exec() (the agent forks for
# iptables-restore, tests for the CLI) while gRPC's threads are busy; the children here never
# use gRPC, so the handlers are off.  Read when gRPC initialises: set before any submodule
# imports it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
