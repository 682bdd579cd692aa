"""The sandbox itself: ordinary runs keep the promise under the fuzz limits.

If these fail, the limits (``CONVT3D_FUZZ_AS_GIB``) are too tight for Numba or
a normal run is broken, and every other fuzz failure is suspect.
"""

from fuzzkit import check_promise


def test_ordinary_runs_work_under_the_limits(warm_cache):
    broken = []
    for case, outcome in warm_cache:
        # The warm-up may compile kernels: only its speed is exempt.
        problems = [p for p in check_promise(case, outcome) if p.kind != "slow"]
        if problems:
            broken.append(f"{case.shell()} (exit {outcome.returncode}, {outcome.seconds:.1f} s): "
                          + "; ".join(f"{p.kind}: {p.detail}" for p in problems)
                          + f"\n  stderr: {outcome.stderr[-1500:]}")
    assert not broken, "\n".join(broken)
