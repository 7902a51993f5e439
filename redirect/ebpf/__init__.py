"""eBPF redirection (issue 14): bcc-loaded programs from bpf/, pinned per pod.

``ops`` installs/verifies/removes; ``plan`` is the pure part; ``loader`` is the only module
importing bcc; ``bpfsys`` wraps the bpf(2) syscall, bpftool and tc; ``origdst`` answers the
agent's "where was this connection going" from the pinned map.
"""
