"""The operator stops when the kubelet asks it to: SIGTERM ends the process, within the pod's grace
period, with or without leader election (else every rollout of the operator waits out the grace
period and ends in SIGKILL)."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from operator_harness import OperatorProcess
from thread_signals import signal_another_thread

from vnpu.cluster.processes import wait_until

pytestmark = pytest.mark.integration

#: Kubernetes' default terminationGracePeriodSeconds (the chart sets none): SIGKILL follows.
GRACE_SECONDS = 30


@pytest.mark.parametrize("to_another_thread", [False, True], ids=["to-the-process", "to-another-thread"])
@pytest.mark.parametrize("leader_elect", [False, True], ids=["standalone", "leader-elect"])
def test_sigterm_stops_the_operator_within_the_grace_period(
    control_plane, namespace, tmp_path, leader_elect: bool, to_another_thread: bool
) -> None:
    """``to-another-thread``: the kernel may hand the kubelet's SIGTERM to any thread (vnpu.signals);
    kopf's asyncio loop hears of it through its wakeup fd wherever it lands."""
    args = ("--leader-elect", "--leader-election-namespace", namespace, "--leader-election-id", "lease")
    operator = OperatorProcess(control_plane, namespace, tmp_path).start(*(args if leader_elect else ()))
    assert operator.proc is not None
    proc = operator.proc.proc
    try:
        if to_another_thread:
            signal_another_thread(proc.pid)
        else:
            proc.send_signal(signal.SIGTERM)  # to the operator alone, as the kubelet signals a container
        try:
            code = proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {GRACE_SECONDS} s after SIGTERM:\n{operator.proc.tail(40)}")
        assert code == 0, operator.proc.tail(40)
    finally:
        operator.stop()


def test_a_standby_stops_at_sigterm_while_waiting_to_lead(control_plane, namespace, tmp_path) -> None:
    """A standby replica waits to lead for as long as the leader lives (days). Before kopf runs, only
    the operator's own handler stands between SIGTERM and the default action (exit -15)."""
    import datetime as dt

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "lease", "namespace": namespace},
        "spec": {"holderIdentity": "the-leader", "leaseDurationSeconds": 3600, "renewTime": now},
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(lease))
    args = ("--leader-elect", "--leader-election-namespace", namespace, "--leader-election-id", "lease")
    operator = OperatorProcess(control_plane, namespace, tmp_path).start(*args)  # healthy as a standby
    assert operator.proc is not None
    try:
        wait_until(lambda: "waiting to lead" in operator.proc.tail(40), 30, "the standby waiting")
        operator.proc.proc.send_signal(signal.SIGTERM)
        try:
            code = operator.proc.proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {GRACE_SECONDS} s after SIGTERM:\n{operator.proc.tail(40)}")
        assert code == 0, operator.proc.tail(40)
        assert "stopped while waiting to lead" in operator.proc.tail(40)
    finally:
        operator.stop()
