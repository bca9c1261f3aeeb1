"""JSON that every client parses: a NaN or infinite float is written as null.

JSON has no NaN or Infinity. Python's json writes them as bare words that JavaScript's
JSON.parse and other strict parsers refuse, and Starlette's JSONResponse refuses to write
them at all (a 500 after the work is done). A reward is NaN where a small model's forward
overflowed (float16, broken weights), and a log-probability can be too; the answer still
goes out, with null where the number is not one.
"""

import json
import math

from fastapi.responses import JSONResponse


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(body, separators=None) -> str:
    """json.dumps with non-finite floats as null (the body walked only where it has one)."""
    try:
        return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=separators)
    except ValueError:    # (only a non-finite float raises this: the rest encodes or TypeErrors)
        return json.dumps(_finite(body), ensure_ascii=False, allow_nan=False,
                          separators=separators)


class FiniteJSONResponse(JSONResponse):
    """The server's response class: Starlette's, its floats written by dumps()."""

    def render(self, content) -> bytes:
        return dumps(content, separators=(",", ":")).encode("utf-8")
