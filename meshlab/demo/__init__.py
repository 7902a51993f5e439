"""``nodeproxy demo``: a real mesh on a namespace cluster, some traffic, and a report.

Four modules, so that everything but the runner is tested without root:

- :mod:`~meshlab.demo.scenario` (pure): who runs where, the service, the policies, the
  connections to make and what each is meant to show (:func:`build_scenario`);
- :mod:`~meshlab.demo.observe`: what the client apps, the echo servers, the agents' JSON access
  logs, tcpdump on the node links, ``/metrics`` and ``/config_dump`` actually said (frozen
  :class:`Observations`), and the verdict (:func:`check`) comparing them with the intent;
- :mod:`~meshlab.demo.report` (pure): the human report (:func:`render_report`); nothing in it
  is assumed, everything was observed;
- :mod:`~meshlab.demo.run`: :func:`run_demo` builds the cluster, starts the CA service and the
  agents (:class:`meshlab.mesh.Mesh`), drives the traffic, collects, reports, and tears
  everything down (also on Ctrl-C, SIGTERM or failure) unless asked to keep it.
"""

from meshlab.demo.observe import Observations, check
from meshlab.demo.report import render_report
from meshlab.demo.run import DemoOptions, DemoResult, leftover_netns, run_demo, teardown_leftovers
from meshlab.demo.scenario import DEMO_GLOB, DEMO_STEM, DemoError, Scenario, build_scenario

__all__ = [
    "DEMO_GLOB",
    "DEMO_STEM",
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "Observations",
    "Scenario",
    "build_scenario",
    "check",
    "leftover_netns",
    "render_report",
    "run_demo",
    "teardown_leftovers",
]
