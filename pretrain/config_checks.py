"""The collector of config problems that every section's validation writes into (pretrain/config.py,
config_moe.py): one line per problem, each naming the field and the fix, raised together as one ConfigError."""

from __future__ import annotations

import math


class Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.lines)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def positive(self, name: str, value: float) -> None:
        if not (value > 0 and math.isfinite(value)):
            self.add(f"{name}={value}: must be a positive number")

    def non_negative(self, name: str, value: float) -> None:
        if not (value >= 0 and math.isfinite(value)):
            self.add(f"{name}={value}: must be zero or a positive number")
