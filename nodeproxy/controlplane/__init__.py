"""The etcd side of the shared control plane: endpoints, client, config store, watch, fleet.

The config model (key layout, split, join, diff) is pure and lives in
:mod:`ztunnel_cfg.store_layout`; this package does the I/O with etcd through aetcd.
"""
