"""linuxns: the project's one setns helper, and the two boundaries that translate its errors
(the daemon's ProxyError, redirect's RedirectError)."""

from __future__ import annotations

import errno
import os
import threading

import pytest

import linuxns
from nodeproxy.errors import ProxyError
from nodeproxy.netns import NetnsWorker
from redirect.errors import RedirectError
from redirect.netns import run_in_netns

MISSING = "/var/run/netns/linuxns-test-does-not-exist"
OWN_NETNS = "/proc/self/ns/net"


def test_missing_namespace_is_an_oserror_with_the_path() -> None:
    caller_ns = linuxns.current_netns_inode()
    with pytest.raises(linuxns.NetnsEnterError) as info:
        linuxns.call_in_netns(MISSING, lambda: None)
    assert isinstance(info.value, OSError)
    assert (info.value.errno, info.value.filename, info.value.opening) == (
        errno.ENOENT, MISSING, True)
    assert linuxns.current_netns_inode() == caller_ns


def test_setns_refused_is_told_apart_from_missing(tmp_path: os.PathLike[str]) -> None:
    not_a_netns = os.path.join(tmp_path, "plain-file")
    open(not_a_netns, "w").close()
    with pytest.raises(linuxns.NetnsEnterError) as info:
        linuxns.call_in_netns(not_a_netns, lambda: None)
    assert info.value.errno == errno.EINVAL
    assert not info.value.opening


@pytest.mark.privileged
def test_call_runs_in_a_fresh_thread_inside_the_namespace() -> None:
    here = linuxns.current_netns_inode()
    caller = threading.get_ident()
    inode, thread = linuxns.call_in_netns(
        OWN_NETNS, lambda: (linuxns.current_netns_inode(), threading.get_ident()))
    assert inode == here
    assert thread != caller


@pytest.mark.privileged
def test_errors_of_the_callable_pass_through_untranslated() -> None:
    def boom() -> None:
        raise FileNotFoundError("not from setns")

    with pytest.raises(FileNotFoundError) as info:
        linuxns.call_in_netns(OWN_NETNS, boom)
    assert not isinstance(info.value, linuxns.NetnsEnterError)


def test_the_daemon_translates_to_proxy_error() -> None:
    with pytest.raises(ProxyError) as info:
        NetnsWorker(MISSING)
    assert info.value.message == (
        f"cannot open network namespace {MISSING}: No such file or directory")
    assert info.value.hint == "does the pod's netns exist (ip netns list)?"


def test_redirect_translates_to_redirect_error() -> None:
    with pytest.raises(RedirectError) as info:
        run_in_netns(MISSING, lambda: None)
    assert info.value.netns == MISSING
    assert "No such file or directory" in info.value.message
    assert info.value.hint == "does the pod's netns exist (ip netns list)?"
