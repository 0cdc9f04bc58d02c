"""Validate real `--json` outputs against the JSON Schemas in schemas/ (the contract for management stacks)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

SCHEMAS = Path(__file__).resolve().parent.parent.parent / "schemas"


@lru_cache(maxsize=None)
def validator(command: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{command}.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


def validate(command: str, data: Any) -> Any:
    """Raise jsonschema.ValidationError unless `data` matches schemas/<command>.schema.json."""
    validator(command).validate(data)
    return data


def validate_output(command: str, stdout: str, rc: int) -> Any:
    """A command's whole --json stdout: one JSON document; the error object when it failed
    without a result of its own (verify, repair and run carry their result even on exit 1)."""
    data = json.loads(stdout)
    if rc != 0 and set(data) == {"error"}:
        return validate("error", data)
    return validate(command, data)
