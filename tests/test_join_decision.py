"""The join decision, ``decide(strategy, successes, failures, pending, timed_out)``, as pure
logic: every strategy against the split/join contract, without a process pool."""

from __future__ import annotations

import itertools
import math
import sys
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cano_mp import ConfigError, JoinConfig, JoinStrategy
from cano_mp._join import decide

WAIT_FOR_ALL = ("all", "quorum", "percentage")
EARLY = ("any", "partial_results")


def needed(strategy: JoinStrategy, total: int) -> int:
    """Successes the contract asks for (completions for partial_timeout)."""
    if strategy.kind == "all":
        return total
    if strategy.kind in ("any", "partial_timeout"):
        return 1
    if strategy.kind in ("quorum", "partial_results"):
        assert strategy.n is not None
        return strategy.n
    assert strategy.p is not None
    # The exact value of the float p times total, rounded up; within a few ulps of an
    # integer it is that integer (1/11 of 11 branches is 1, not 2).
    exact = Fraction(strategy.p) * total
    k = round(exact)
    if abs(exact - k) <= Fraction(4 * sys.float_info.epsilon) * max(1, k):
        return max(1, k)
    return max(1, math.ceil(exact))


def expected(strategy: JoinStrategy, ok: int, failed: int, pending: int, timed_out: bool) -> str:
    """The contract's answer, written independently of the library."""
    if strategy.kind == "partial_timeout":
        if pending == 0:
            return "proceed"
        if timed_out:
            return "proceed" if ok + failed >= 1 else "fail"
        return "wait"
    need = needed(strategy, ok + failed + pending)
    if ok + pending < need:
        return "fail"  # can no longer be met
    if ok >= need and (strategy.kind in EARLY or pending == 0 or timed_out):
        return "proceed"
    if timed_out:
        return "fail"
    return "wait"


# -- strategies ------------------------------------------------------------------------------
@st.composite
def splits(draw: st.DrawFn) -> tuple[JoinStrategy, int, int, int, bool]:
    """A strategy valid for its split, with branch counts that add up to the split's size."""
    total = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["all", "any", "quorum", "percentage", "partial_results", "pt"]))
    if kind in ("quorum", "partial_results"):
        strategy = getattr(JoinStrategy, kind)(draw(st.integers(1, total)))
    elif kind == "percentage":
        den = draw(st.integers(1, 100))
        strategy = JoinStrategy.percentage(draw(st.integers(1, den)) / den)
    elif kind == "pt":
        strategy = JoinStrategy.partial_timeout()
    else:
        strategy = getattr(JoinStrategy, kind)()
    ok = draw(st.integers(0, total))
    failed = draw(st.integers(0, total - ok))
    return strategy, ok, failed, total - ok - failed, draw(st.booleans())


def all_strategies(total: int) -> list[JoinStrategy]:
    out = [JoinStrategy.all(), JoinStrategy.any(), JoinStrategy.partial_timeout()]
    for n in range(1, total + 1):
        out += [JoinStrategy.quorum(n), JoinStrategy.partial_results(n)]
    out += [JoinStrategy.percentage(p) for p in (0.1, 0.25, 1 / 3, 0.5, 2 / 3, 0.75, 0.9, 1.0)]
    return out


# -- exhaustive over small splits ---------------------------------------------------------------
@pytest.mark.parametrize("total", range(1, 8))
def test_every_small_split_matches_the_contract(total: int) -> None:
    for strategy in all_strategies(total):
        for ok, failed in itertools.product(range(total + 1), repeat=2):
            pending = total - ok - failed
            if pending < 0:
                continue
            for timed_out in (False, True):
                got = decide(strategy, ok, failed, pending, timed_out)
                want = expected(strategy, ok, failed, pending, timed_out)
                assert got == want, (strategy, ok, failed, pending, timed_out)


# -- one property per sentence of the contract --------------------------------------------------
@given(splits())
def test_matches_the_reference(case: tuple[JoinStrategy, int, int, int, bool]) -> None:
    strategy, ok, failed, pending, timed_out = case
    assert decide(strategy, ok, failed, pending, timed_out) == expected(
        strategy, ok, failed, pending, timed_out
    )


@given(splits())
def test_never_waits_once_timed_out(case: tuple[JoinStrategy, int, int, int, bool]) -> None:
    strategy, ok, failed, pending, _ = case
    assert decide(strategy, ok, failed, pending, True) in ("proceed", "fail")


@given(splits())
def test_never_waits_once_every_branch_finished(
    case: tuple[JoinStrategy, int, int, int, bool],
) -> None:
    strategy, ok, failed, _, timed_out = case
    assert decide(strategy, ok, failed, 0, timed_out) in ("proceed", "fail")


@given(splits())
def test_wait_for_all_strategies_proceed_only_when_all_finished_or_timed_out(
    case: tuple[JoinStrategy, int, int, int, bool],
) -> None:
    strategy, ok, failed, pending, timed_out = case
    if strategy.kind not in WAIT_FOR_ALL:
        return
    verdict = decide(strategy, ok, failed, pending, timed_out)
    if verdict == "proceed":
        assert pending == 0 or timed_out
        assert ok >= needed(strategy, ok + failed + pending)
    if not timed_out and pending > 0 and ok + pending >= needed(strategy, ok + failed + pending):
        assert verdict == "wait"


@given(splits())
def test_early_strategies_proceed_as_soon_as_n_succeeded(
    case: tuple[JoinStrategy, int, int, int, bool],
) -> None:
    strategy, ok, failed, pending, timed_out = case
    if strategy.kind not in EARLY:
        return
    n = needed(strategy, ok + failed + pending)
    verdict = decide(strategy, ok, failed, pending, timed_out)
    assert (verdict == "proceed") == (ok >= n)


@given(splits())
def test_fails_as_soon_as_the_threshold_cannot_be_met(
    case: tuple[JoinStrategy, int, int, int, bool],
) -> None:
    strategy, ok, failed, pending, timed_out = case
    if strategy.kind == "partial_timeout":
        return
    need = needed(strategy, ok + failed + pending)
    verdict = decide(strategy, ok, failed, pending, timed_out)
    if ok + pending < need:
        assert verdict == "fail"
    elif not timed_out:
        assert verdict != "fail"


@given(splits())
def test_timeout_proceeds_exactly_when_the_threshold_is_met(
    case: tuple[JoinStrategy, int, int, int, bool],
) -> None:
    strategy, ok, failed, pending, _ = case
    verdict = decide(strategy, ok, failed, pending, True)
    if strategy.kind == "partial_timeout":
        assert (verdict == "proceed") == (pending == 0 or ok + failed >= 1)
    else:
        assert (verdict == "proceed") == (ok >= needed(strategy, ok + failed + pending))


@given(st.integers(0, 30), st.integers(0, 30), st.integers(1, 30))
def test_partial_timeout(ok: int, failed: int, pending: int) -> None:
    pt = JoinStrategy.partial_timeout()
    if ok + failed:
        assert decide(pt, ok, failed, 0, False) == "proceed"
    assert decide(pt, ok, failed, pending, False) == "wait"
    assert decide(pt, ok, failed, pending, True) == ("proceed" if ok + failed else "fail")


def test_partial_timeout_counts_a_failure_as_completed() -> None:
    pt = JoinStrategy.partial_timeout()
    assert decide(pt, 0, 1, 3, True) == "proceed"
    assert decide(pt, 0, 4, 0, False) == "proceed"
    assert decide(pt, 0, 0, 4, True) == "fail"


@given(splits(), st.sampled_from(["ok", "failed"]))
def test_a_decision_is_final(case: tuple[JoinStrategy, int, int, int, bool], outcome: str) -> None:
    """A branch finishing after a proceed/fail verdict never changes it."""
    strategy, ok, failed, pending, timed_out = case
    verdict = decide(strategy, ok, failed, pending, False)
    if verdict == "wait" or pending == 0:
        return
    later = (ok + 1, failed) if outcome == "ok" else (ok, failed + 1)
    assert decide(strategy, *later, pending - 1, timed_out) == verdict


@given(splits())
def test_all_fails_at_the_first_failure(case: tuple[JoinStrategy, int, int, int, bool]) -> None:
    _, ok, failed, pending, timed_out = case
    verdict = decide(JoinStrategy.all(), ok, failed, pending, timed_out)
    if failed:
        assert verdict == "fail"
    elif pending == 0:
        assert verdict == "proceed"
    else:
        assert verdict == ("fail" if timed_out else "wait")


def test_any_and_all_by_hand() -> None:
    assert decide(JoinStrategy.any(), 1, 0, 4) == "proceed"
    assert decide(JoinStrategy.any(), 0, 4, 1) == "wait"
    assert decide(JoinStrategy.any(), 0, 5, 0) == "fail"
    assert decide(JoinStrategy.all(), 4, 0, 1) == "wait"
    assert decide(JoinStrategy.all(), 4, 1, 0) == "fail"
    assert decide(JoinStrategy.all(), 3, 1, 1) == "fail"  # fail-fast, does not wait
    assert decide(JoinStrategy.all(), 5, 0, 0) == "proceed"


def test_quorum_waits_for_every_branch_even_when_met() -> None:
    q = JoinStrategy.quorum(2)
    assert decide(q, 2, 0, 3) == "wait"
    assert decide(q, 2, 0, 3, True) == "proceed"
    assert decide(q, 2, 3, 0) == "proceed"
    assert decide(q, 1, 3, 1) == "wait"
    assert decide(q, 1, 4, 0) == "fail"
    assert decide(q, 0, 4, 1) == "fail"


def test_partial_results_proceeds_at_the_nth_success() -> None:
    pr = JoinStrategy.partial_results(2)
    assert decide(pr, 1, 0, 4) == "wait"
    assert decide(pr, 2, 0, 3) == "proceed"
    assert decide(pr, 1, 3, 1) == "wait"
    assert decide(pr, 1, 4, 0) == "fail"


# -- percentage ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("p", "total", "need"),
    [
        (0.3, 10, 3),  # 0.3 * 10 is 3.0000000000000004 in binary floating point
        (0.7, 10, 7),
        (0.1, 10, 1),
        (0.6, 5, 3),
        (0.5, 3, 2),
        (0.34, 3, 2),
        (1 / 3, 3, 1),
        (2 / 3, 3, 2),
        (2 / 3, 6, 4),
        (0.01, 1, 1),
        (0.99, 100, 99),
        (1.0, 7, 7),
        (1, 4, 4),
    ],
)
def test_percentage_needs_ceil_of_p_times_branches(p: float, total: int, need: int) -> None:
    strategy = JoinStrategy.percentage(p)
    assert strategy.required(total) == need
    assert decide(strategy, need, total - need, 0) == "proceed"
    assert decide(strategy, need - 1, total - need + 1, 0) == "fail"
    if need < total:
        assert decide(strategy, need, 0, total - need) == "wait"  # waits for all
        assert decide(strategy, need, 0, total - need, True) == "proceed"


@given(st.integers(1, 100), st.integers(1, 100), st.integers(1, 200))
def test_percentage_of_a_decimal_fraction(den: int, num_seed: int, total: int) -> None:
    num = 1 + num_seed % den
    p = num / den
    need = math.ceil(Fraction(num, den) * total)
    strategy = JoinStrategy.percentage(p)
    assert strategy.required(total) == need
    assert decide(strategy, need, total - need, 0) == "proceed"
    assert decide(strategy, need - 1, total - need + 1, 0) == "fail"


@pytest.mark.parametrize("decimal", [f"0.{d:02d}" for d in range(1, 100)] + ["1.0"])
def test_percentage_written_as_a_decimal(decimal: str) -> None:
    strategy = JoinStrategy.percentage(float(decimal))
    for total in range(1, 61):
        assert strategy.required(total) == math.ceil(Fraction(decimal) * total), total


# -- construction --------------------------------------------------------------------------------
@given(st.integers(max_value=0))
def test_n_below_one_is_a_config_error(n: int) -> None:
    with pytest.raises(ConfigError):
        JoinStrategy.quorum(n)
    with pytest.raises(ConfigError):
        JoinStrategy.partial_results(n)


@given(st.integers(min_value=1, max_value=10**6))
def test_n_of_one_or_more_is_kept(n: int) -> None:
    assert JoinStrategy.quorum(n).n == n and JoinStrategy.quorum(n).kind == "quorum"
    assert JoinStrategy.partial_results(n).n == n


@pytest.mark.parametrize("bad", [True, 1.0, 2.5, "2", None])
def test_n_must_be_an_int(bad: object) -> None:
    with pytest.raises(ConfigError):
        JoinStrategy.quorum(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        JoinStrategy.partial_results(bad)  # type: ignore[arg-type]


@given(
    st.one_of(
        st.floats(max_value=0.0),
        st.floats(min_value=1.0, exclude_min=True),
        st.just(float("nan")),
        st.integers(max_value=0),
        st.integers(min_value=2),
    )
)
def test_p_outside_zero_one_is_a_config_error(p: float) -> None:
    with pytest.raises(ConfigError):
        JoinStrategy.percentage(p)


@given(st.floats(min_value=0.0, max_value=1.0, exclude_min=True))
def test_p_within_zero_one_is_kept(p: float) -> None:
    strategy = JoinStrategy.percentage(p)
    assert strategy.p == p and strategy.kind == "percentage"
    assert 1 <= strategy.required(10) <= 10


@pytest.mark.parametrize("bad", [True, "0.5", None, [0.5]])
def test_p_must_be_a_number(bad: object) -> None:
    with pytest.raises(ConfigError):
        JoinStrategy.percentage(bad)  # type: ignore[arg-type]


def test_join_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError):
        JoinConfig("all", "S")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        JoinConfig(JoinStrategy.all(), "S", timeout=0)
    with pytest.raises(ConfigError):
        JoinConfig(JoinStrategy.all(), "S", timeout=-1.0)
    with pytest.raises(ConfigError):
        JoinConfig(JoinStrategy.all(), "S", max_parallel=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        JoinConfig(JoinStrategy.all(), "S", result_key=3)  # type: ignore[arg-type]


def test_join_config_keeps_its_values() -> None:
    from datetime import timedelta

    cfg = JoinConfig(
        JoinStrategy.quorum(2), "J", timeout=timedelta(seconds=1.5), max_parallel=3, result_key="r"
    )
    assert cfg.strategy == JoinStrategy.quorum(2) and cfg.join_state == "J"
    assert cfg.timeout == 1.5 and cfg.max_parallel == 3 and cfg.result_key == "r"


def test_strategies_compare_and_print_by_value() -> None:
    assert JoinStrategy.quorum(3) == JoinStrategy.quorum(3) != JoinStrategy.quorum(2)
    assert repr(JoinStrategy.all()) == "JoinStrategy.all()"
    assert repr(JoinStrategy.partial_results(2)) == "JoinStrategy.partial_results(2)"
    assert repr(JoinStrategy.percentage(0.5)) == "JoinStrategy.percentage(0.5)"


def test_percentage_just_above_a_boundary_needs_one_more() -> None:
    assert JoinStrategy.percentage(0.5000000001).required(2) == 2
    assert decide(JoinStrategy.percentage(0.5000000001), 1, 1, 0) == "fail"
