"""reject_unverified_recipient (placeholder: being written)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trimail.policy.registry import DUNNO, Request, Result, Verdict, register

if TYPE_CHECKING:
    from trimail.policy.restrictions import Policy


@register("reject_unverified_recipient", needs="recipient")
async def reject_unverified_recipient(policy: Policy, req: Request, kind: str, arg: str | None,
                                      verdict: Verdict) -> Result:
    return DUNNO
