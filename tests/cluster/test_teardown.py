"""The end of a rank (issue 13: "terminate called without an active exception", exit 250 from the launcher).

A process group left to the interpreter's exit lets gloo's worker thread release a finished collective while
Python finalizes, and the process dies in std::terminate (trainer/distributed.py explains the race). The forced
bad order (DSV3_TEARDOWN_TEST=late-release: a collective in flight that completes while rank 1 is on its way out
of the interpreter) aborted rank 1 every time before `end_process`; now both ranks exit as they should.
tests/cluster/teardown_harness.py repeats every way out many times (not part of the test run).
"""

from __future__ import annotations

import pytest

from tests.cluster.teardown_harness import EXPECTED, run_once


@pytest.mark.multiprocess
def test_the_forced_bad_exit_order_ends_cleanly():
    codes, outs = run_once("normal", "late-release,report")
    tails = "\n".join(o[-2000:] for o in outs)
    assert codes == [0, 0], tails
    assert not any("terminate called" in o for o in outs), tails
    # every gloo thread is gone before the interpreter ends (the DeepSpeed engine nobody destroyed included)
    ends = [line for o in outs for line in o.splitlines() if line.startswith("end_process: rank")]
    assert len(ends) == 2 and not any("gloo" in line for line in ends), ends


@pytest.mark.multiprocess
def test_a_preempted_run_ends_with_75_through_the_same_teardown():
    codes, outs = run_once("preempt", "late-release")
    tails = "\n".join(o[-2000:] for o in outs)
    assert codes == [EXPECTED["preempt"]] * 2 and not any("terminate called" in o for o in outs), tails
    assert "preempted (a signal to another rank): stopped after step 3" in outs[0]
