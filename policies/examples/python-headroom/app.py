"""Headroom pool sizing, in Python: keep a percentage of the allocated pods as idle headroom.

The idle buffer is `headroomPercent` of the allocated pods (rounded up), never less than
bufferMin nor more than bufferMax, on top of allocated pods and unmet demand; the total stays
within [poolMin, poolMax]. Settings (optional): {"headroomPercent": 25}
"""

import json
import math

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.pool_sizing import PolicyError_InvalidSettings, PoolSnapshot, SizingDecision


def headroom_percent(settings: str) -> float:
    try:
        parsed = json.loads(settings or "{}")
    except ValueError as e:
        raise Err(PolicyError_InvalidSettings(f"settings are not JSON: {e}"))
    if not isinstance(parsed, dict) or set(parsed) - {"headroomPercent"}:
        raise Err(PolicyError_InvalidSettings('expected {"headroomPercent": <number>}'))
    percent = parsed.get("headroomPercent", 25)
    if not isinstance(percent, (int, float)) or isinstance(percent, bool) or not 0 <= percent <= 1000:
        raise Err(PolicyError_InvalidSettings("headroomPercent must be a number in [0, 1000]"))
    return float(percent)


class PoolSizing(exports.PoolSizing):
    def validate_settings(self, settings: str) -> None:
        headroom_percent(settings)

    def decide(self, settings: str, pool: PoolSnapshot) -> SizingDecision:
        percent = headroom_percent(settings)
        b = pool.bounds
        headroom = math.ceil(pool.allocated * percent / 100)
        idle = min(max(headroom, b.buffer_min), max(b.buffer_max, b.buffer_min))
        wanted = pool.allocated + pool.unmet_demand + idle
        desired = min(max(wanted, b.pool_min), b.pool_max)
        reason = (
            f"{pool.allocated} allocated + {pool.unmet_demand} unmet demand + {idle} idle "
            f"({percent:g}% headroom within buffer [{b.buffer_min}, {b.buffer_max}])"
        )
        if desired != wanted:
            reason += f", bounded to [{b.pool_min}, {b.pool_max}]"
        return SizingDecision(desired_total=desired, reason=reason)
