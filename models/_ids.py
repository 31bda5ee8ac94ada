"""The one rule for device, update and metric ids (and fleet and topic-root names): each is an
MQTT topic level and a file name. Standard library only, so any module may import it cheaply;
`models._wire.validate_id` is the checking form that raises `WireError`."""

from __future__ import annotations

import re
from typing import TypeGuard

ID_RULE = "1-64 characters of A-Z a-z 0-9 _ . -"
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
NAME_RULE = f"{ID_RULE}, other than . and .."  # what `is_valid_id` checks, in words


def is_valid_id(value: object) -> TypeGuard[str]:
    """Whether `value` follows `NAME_RULE` (``.`` and ``..`` are paths, not names)."""
    return (isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None
            and value not in {".", ".."})
