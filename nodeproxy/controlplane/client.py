"""An aetcd client for a :class:`StoreSpec`: TLS with a client certificate, several endpoints.

aetcd 1.0 opens insecure channels only; :class:`TlsClient` replaces just the channel creation
(its stubs, watcher and error mapping are aetcd's).  Every call sends etcd's ``hasleader``
metadata, so a watch on a member cut off from the leader fails instead of going silent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

from nodeproxy.controlplane.endpoint import StoreSpec
from nodeproxy.controlplane.errors import StoreError

_MAX_MESSAGE = 512 * 1024 * 1024  # a 100,000-workload listing is well above gRPC's 4 MiB


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read etcd {what} {path}: {exc.strerror or exc}") from None


class TlsClient(aetcd.Client):  # type: ignore[misc]
    def __init__(self, spec: StoreSpec) -> None:
        options: dict[str, Any] = {
            "grpc.max_receive_message_length": _MAX_MESSAGE,
            "grpc.max_send_message_length": _MAX_MESSAGE,
            # Reconnect promptly after an outage (gRPC's default backoff grows to 120 s).
            "grpc.initial_reconnect_backoff_ms": 200,
            "grpc.max_reconnect_backoff_ms": 2000,
        }
        self._spec = spec
        self._credentials: grpc.ChannelCredentials | None = None
        if spec.tls:
            assert spec.ca is not None
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(spec.ca, "CA bundle"),
                private_key=_read(spec.key, "client key") if spec.key else None,
                certificate_chain=_read(spec.cert, "client certificate") if spec.cert else None,
            )
            options["grpc.ssl_target_name_override"] = spec.server_name or spec.endpoints[0][0]
        super().__init__(host=spec.target, port=0, timeout=spec.timeout, options=options)

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = self._spec.target
        opts = list(self._options.items())
        if self._credentials is not None:
            self.channel = rpc.secure_channel(target, self._credentials, options=opts)
        else:
            self.channel = rpc.insecure_channel(target, options=opts)
        self.metadata = (("hasleader", "true"),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                        metadata=self.metadata)
        self._connected.set()


def make_client(spec: StoreSpec) -> aetcd.Client:
    return TlsClient(spec)


def describe(exc: BaseException) -> str:
    """One line for an aetcd/gRPC failure (they carry the server's text in ``args``)."""
    text = str(exc).strip() or type(exc).__name__
    cause = exc.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):
        text = f"{cause.code().name}: {cause.details()}"
    return text
