"""Regression: authorization has ONE evaluator.  The decision and its explanation used to
come from two copies of every field check, kept equal by an ``assert`` on the data path;
now the fast boolean is the explaining evaluator with phrase building switched off."""

from __future__ import annotations

from ztunnel_cfg import authz


def test_decision_and_explanation_share_one_evaluator() -> None:
    assert "_rule" in authz._rule_ok.__code__.co_names
    assert "_match" in authz._rule.__code__.co_names
    for duplicate in ("_match_ok", "_str_ok", "_net_ok", "_match_fields"):
        assert not hasattr(authz, duplicate), duplicate

