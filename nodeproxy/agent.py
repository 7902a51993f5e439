"""The node agent: enrolls the pods scheduled on this node and follows config changes.

Enrolling a pod = redirection rules in its netns (through the injected ``Redirector``; the agent
never imports ``redirect``), its identity's certificate, and the three listeners opened inside
its netns.  A pod counts as enrolled only when all three are in place.  Failing closed: the
rules go in first and are never taken out because of an error; a pod whose certificate or
listeners are missing keeps its rules, so its connections are redirected to ports nobody
listens on and refused (RST) instead of flowing in plaintext.  Only removing the pod from the
config (or ``--cleanup-on-exit``) removes its rules.  Readiness is true once every pod of this
node is enrolled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from nodeproxy.metrics import Metrics
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.model import Protocol as WorkloadProtocol
from ztunnel_cfg.model import Workload
from ztunnel_cfg.routing import is_waypoint
from ztunnel_cfg.snapshot import Snapshot

log = logging.getLogger("nodeproxy.agent")
_EXTRA = {"component": "agent"}


class Redirector(Protocol):
    """Installs/removes capture rules in a pod netns.  Implemented by the CLI with ``redirect``."""

    def install(self, netns: str) -> None: ...

    def remove(self, netns: str) -> None: ...


class PodProxy(Protocol):
    workload: Workload

    async def start(self) -> None: ...

    async def close(self, drain_timeout: float) -> None: ...

    def update(self, workload: Workload) -> None: ...


PodProxyFactory = Callable[[Workload], Awaitable[PodProxy]]


@dataclass(frozen=True, slots=True)
class EnrollmentFailure:
    uid: str
    reason: str
    netns: str | None = None  # whose rules stay installed while the pod is not enrolled


class Agent:
    def __init__(
        self,
        node: str,
        pod_proxy_factory: PodProxyFactory,
        metrics: Metrics,
        redirector: Redirector | None = None,
        *,
        drain_timeout: float = 5.0,
        cleanup_on_exit: bool = False,
        in_pod: bool = True,
    ) -> None:
        self.node = node
        self._factory = pod_proxy_factory
        self._metrics = metrics
        self._redirector = redirector
        self._drain_timeout = drain_timeout
        self._cleanup_on_exit = cleanup_on_exit
        self._in_pod = in_pod
        self.pods: dict[str, PodProxy] = {}
        self.failures: dict[str, EnrollmentFailure] = {}
        self._lock = asyncio.Lock()
        self._desired: tuple[Workload, ...] = ()

    # -- readiness ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return not self.failures and all(w.uid in self.pods for w in self._desired)

    def readiness_detail(self) -> str:
        missing = [w.uid for w in self._desired if w.uid not in self.pods]
        if not missing:
            return f"ready: {len(self.pods)} pod(s) enrolled on {self.node}"
        reasons = [f"{uid}: {self.failures[uid].reason}" if uid in self.failures else uid
                   for uid in missing]
        return "not ready, waiting for: " + "; ".join(reasons)

    def readiness_summary(self) -> str:
        """Counts only, for the node's public readiness port: no pod names or error text."""
        if self.ready:
            return "ready"
        enrolled = sum(1 for w in self._desired if w.uid in self.pods)
        return f"not ready: {enrolled} of {len(self._desired)} pods enrolled"

    # -- convergence --------------------------------------------------------------------------
    def desired(self, snapshot: Snapshot) -> tuple[Workload, ...]:
        """Mesh (HBONE) workloads of this node; in-pod mode needs their netns path.
        Waypoints are not captured: they terminate HBONE themselves."""
        return tuple(
            w for w in snapshot.workloads_on_node(self.node)
            if w.protocol is WorkloadProtocol.HBONE and (w.netns or not self._in_pod)
            and not is_waypoint(snapshot, w)
        )

    async def apply(self, snapshot: Snapshot) -> None:
        """Converge enrolled pods to the snapshot: enroll new, un-enroll removed, update rest."""
        async with self._lock:
            desired = self.desired(snapshot)
            self._desired = desired
            wanted = {w.uid: w for w in desired}
            for uid in [uid for uid in self.pods if uid not in wanted]:
                await self._unenroll(uid)
            for uid, workload in wanted.items():
                pod = self.pods.get(uid)
                if pod is not None and pod.workload.netns == workload.netns:
                    pod.update(workload)
                    continue
                if pod is not None:  # netns changed: the old listeners are useless
                    await self._unenroll(uid)
                await self._enroll(workload)
            for uid in [uid for uid in self.failures if uid not in wanted]:
                # Removed from the config: its capture rules go, like an enrolled pod's.
                await self._remove_rules(self.failures.pop(uid).netns)
            self._count()

    async def retry_failed(self) -> None:
        """Try again to enroll pods that failed (called periodically)."""
        async with self._lock:
            for workload in self._desired:
                if workload.uid in self.failures:
                    await self._enroll(workload)
            self._count()

    def _count(self) -> None:
        self._metrics.enrolled_pods.set(len(self.pods))
        self._metrics.unenrolled_pods.set(sum(1 for w in self._desired if w.uid not in self.pods))

    async def _enroll(self, workload: Workload) -> None:
        try:
            # Capture first (installation converges, so retries re-check the rules), then the
            # certificate and listeners; until those exist the rules refuse the pod's traffic.
            if self._redirector is not None and workload.netns is not None:
                await asyncio.to_thread(self._redirector.install, workload.netns)
            pod = await self._factory(workload)
            await pod.start()
        except (NodeproxyError, OSError) as exc:
            reason = str(exc)
            log.error("cannot enroll pod %s: %s; its traffic is refused until it is enrolled "
                      "(retrying)", workload.uid, reason, extra=_EXTRA)
            self.failures[workload.uid] = EnrollmentFailure(workload.uid, reason, workload.netns)
            self._metrics.enrollment_failures.inc()
            return
        self.failures.pop(workload.uid, None)
        self.pods[workload.uid] = pod
        log.info("enrolled pod %s (%s) netns=%s", workload.uid, workload.identity,
                 workload.netns, extra=_EXTRA)

    async def _remove_rules(self, netns: str | None) -> None:
        if self._redirector is None or netns is None:
            return
        try:
            await asyncio.to_thread(self._redirector.remove, netns)
        except NodeproxyError as exc:
            log.error("removing rules from %s failed: %s", netns, exc, extra=_EXTRA)

    async def _unenroll(self, uid: str, *, remove_rules: bool = True) -> None:
        pod = self.pods.pop(uid)
        await pod.close(self._drain_timeout)
        if remove_rules:
            await self._remove_rules(pod.workload.netns)
        log.info("un-enrolled pod %s", uid, extra=_EXTRA)

    async def shutdown(self) -> None:
        """Drain every pod.  Rules stay (traffic fails closed) unless cleanup_on_exit."""
        async with self._lock:
            pods = list(self.pods)
            await asyncio.gather(
                *(self._unenroll(uid, remove_rules=self._cleanup_on_exit) for uid in pods),
                return_exceptions=True,
            )
            self._metrics.enrolled_pods.set(0)

