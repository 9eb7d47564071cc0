"""The eviction policy: a pure function from entries, usage, limits and time to a frozen plan."""

from eviction.policy import (
    Entry,
    EvictionPlan,
    Limits,
    Usage,
    Victim,
    VictimReason,
    bytes_freed_by,
    is_hot,
    plan,
    plan_watermark,
)

__all__ = [
    "Entry",
    "EvictionPlan",
    "Limits",
    "Usage",
    "Victim",
    "VictimReason",
    "bytes_freed_by",
    "is_hot",
    "plan",
    "plan_watermark",
]
