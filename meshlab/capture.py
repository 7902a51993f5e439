"""Packet capture with tcpdump inside a namespace, and a small pure pcap reader.

Used to prove what crosses the node-to-node link: which TCP flows (to port 15008 when the
mesh is on) and whether a plaintext marker ever appeared in any packet.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from meshlab.topology import LabError

_LINKTYPE_ETHERNET = 1
_LINKTYPE_RAW = 101
_LINKTYPE_LINUX_SLL = 113
_LINKTYPE_LINUX_SLL2 = 276
_ETH_P_IP = 0x0800
_ETH_P_8021Q = 0x8100


@dataclass(frozen=True, slots=True)
class Packet:
    src: str
    dst: str
    sport: int
    dport: int
    flags: int  # TCP flags byte
    payload: bytes

    @property
    def flow(self) -> tuple[str, str, int, int]:
        return (self.src, self.dst, self.sport, self.dport)


def _ip_offset(linktype: int, frame: bytes) -> int | None:
    """Offset of the IPv4 header in ``frame``, or None when it is not IPv4."""
    if linktype == _LINKTYPE_ETHERNET:
        off, proto = 14, struct.unpack_from("!H", frame, 12)[0] if len(frame) >= 14 else 0
        if proto == _ETH_P_8021Q and len(frame) >= 18:
            off, proto = 18, struct.unpack_from("!H", frame, 16)[0]
    elif linktype == _LINKTYPE_LINUX_SLL:
        off, proto = 16, struct.unpack_from("!H", frame, 14)[0] if len(frame) >= 16 else 0
    elif linktype == _LINKTYPE_LINUX_SLL2:
        off, proto = 20, struct.unpack_from("!H", frame, 0)[0] if len(frame) >= 20 else 0
    elif linktype == _LINKTYPE_RAW:
        return 0 if frame and frame[0] >> 4 == 4 else None
    else:
        return None
    return off if proto == _ETH_P_IP else None


def parse_pcap(data: bytes) -> list[Packet]:
    """IPv4/TCP packets of a classic pcap file (either byte order, us or ns stamps).
    Other packets are skipped; a truncated tail (capture killed mid-write) is ignored."""
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise LabError("not a pcap file (pcapng is not supported)",
                       hint="capture with 'tcpdump -w' which writes classic pcap")
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    packets: list[Packet] = []
    pos = 24
    while pos + 16 <= len(data):
        incl = struct.unpack_from(endian + "I", data, pos + 8)[0]
        frame = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        if len(frame) < incl:
            break
        off = _ip_offset(linktype, frame)
        if off is None or len(frame) < off + 20:
            continue
        ver_ihl = frame[off]
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or frame[off + 9] != 6:
            continue
        total = struct.unpack_from("!H", frame, off + 2)[0]
        src = str(ipaddress.IPv4Address(frame[off + 12 : off + 16]))
        dst = str(ipaddress.IPv4Address(frame[off + 16 : off + 20]))
        tcp = off + ihl
        if len(frame) < tcp + 20:
            continue
        sport, dport = struct.unpack_from("!HH", frame, tcp)
        doff = (frame[tcp + 12] >> 4) * 4
        flags = frame[tcp + 13]
        end = min(len(frame), off + total) if total else len(frame)
        packets.append(Packet(src, dst, sport, dport, flags, frame[tcp + doff : end]))
    return packets


@dataclass(frozen=True, slots=True)
class CaptureResult:
    raw: bytes
    packets: tuple[Packet, ...]

    def contains(self, marker: bytes) -> bool:
        """Whether ``marker`` occurs anywhere in the capture file (headers included, so
        nothing can hide in a layer the parser skipped)."""
        return marker in self.raw

    def flows(self) -> list[tuple[str, str, int, int]]:
        """Distinct (src, dst, sport, dport) tuples in first-seen order."""
        return list(dict.fromkeys(p.flow for p in self.packets))

    def ports(self) -> set[int]:
        return {p for pkt in self.packets for p in (pkt.sport, pkt.dport)}

    def payload_bytes(self) -> int:
        return sum(len(p.payload) for p in self.packets)


class Capture:
    """A running tcpdump; :meth:`stop` ends it and returns the :class:`CaptureResult`."""

    def __init__(self, proc: subprocess.Popen[bytes], path: str, tmpdir: str) -> None:
        self._proc = proc
        self.path = path
        self._tmpdir = tmpdir
        self.result: CaptureResult | None = None

    @classmethod
    def start(
        cls, wrapper: Sequence[str], iface: str, bpf_filter: str = "tcp", timeout: float = 10.0
    ) -> Capture:
        """Run tcpdump (``wrapper`` enters the namespace, e.g. ``ip netns exec X``) and wait
        until it reports it is listening, so no early packet is missed."""
        tmpdir = tempfile.mkdtemp(prefix="nodeproxy-lab-cap-")
        path = os.path.join(tmpdir, "capture.pcap")
        # --immediate-mode: without it recent kernels/libpcap hold packets in the ring
        # buffer and a SIGINT'd tcpdump writes none of them.  -Z root: write as root.
        argv = [*wrapper, "tcpdump", "--immediate-mode", "-U", "-n", "-Z", "root", "-s", "0",
                "-i", iface, "-w", path, *bpf_filter.split()]
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except FileNotFoundError:
            os.rmdir(tmpdir)
            raise LabError(
                "tcpdump not found", hint="install it: apt-get install tcpdump"
            ) from None
        cap = cls(proc, path, tmpdir)
        assert proc.stderr is not None
        deadline = time.monotonic() + timeout
        seen = b""
        while b"listening on" not in seen:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stderr], [], [], max(left, 0))
            chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
            if not chunk:
                cap.close()
                why = "timed out" if left <= 0 or not ready else "exited"
                raise LabError(
                    f"tcpdump on {iface} {why} before listening: {seen.decode(errors='replace')}",
                    hint="does the interface exist in that namespace?",
                )
            seen += chunk
        return cap

    def stop(self) -> CaptureResult:
        """Stop tcpdump (flushing its buffer) and parse what it wrote."""
        if self.result is not None:
            return self.result
        if self._proc.poll() is None:
            self._settle()
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            raw = b""
        self.result = CaptureResult(raw, tuple(parse_pcap(raw)))
        self._cleanup_files()
        return self.result

    def _settle(self, quiet: float = 0.05, limit: float = 1.0) -> None:
        # Packets of a just-finished exchange may still be on their way through tcpdump
        # (final ACK/FIN): wait until the file stops growing for a moment before SIGINT.
        deadline = time.monotonic() + limit
        last = -1
        while time.monotonic() < deadline:
            try:
                size = os.path.getsize(self.path)
            except OSError:
                size = 0
            if size == last:
                return
            last = size
            time.sleep(quiet)

    def close(self) -> None:
        """Stop without caring about the result (teardown)."""
        if self.result is None:
            with contextlib.suppress(Exception):
                self.stop()
        self._cleanup_files()

    def _cleanup_files(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._tmpdir)
