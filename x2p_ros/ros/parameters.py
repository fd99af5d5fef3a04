"""Parameter descriptors with a range, for the package's nodes: rclpy refuses a
value outside it, at start and at runtime."""
from __future__ import annotations

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor


def ranged(lo, hi, text: str) -> ParameterDescriptor:
    """An integer range for integer bounds, else a floating-point one."""
    if isinstance(lo, int) and isinstance(hi, int):
        return ParameterDescriptor(description=text, integer_range=[IntegerRange(from_value=lo, to_value=hi)])
    return ParameterDescriptor(description=text, floating_point_range=[FloatingPointRange(from_value=lo, to_value=hi)])
