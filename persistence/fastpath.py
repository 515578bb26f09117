"""Compiled loaders: the schemas' rules as straight-line Python, for valid batches.

marshmallow stays the single source of truth. :func:`compile_loader` reads a
schema's fields (their types and parameters) and generates one function
that checks and converts a whole list of records with the same rules,
without marshmallow's per-field machinery (about ten times faster). It
returns None as soon as anything is wrong; the caller then runs
marshmallow itself, which reports every error with its messages. A
property test (tests/test_fastpath.py) checks that both accept and refuse
exactly the same inputs and load the same records.

A field type the compiler does not know raises at compile time, so a new
rule cannot silently escape the fast path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marshmallow import Schema, fields, validate

from persistence import schemas

Loader = Callable[[list[Any]], list[dict[str, Any]] | None]

_MISSING = object()


def compile_loader(schema: Schema) -> Loader:
    """A function loading a list of items like ``schema.load``, or returning None if any fails."""
    namespace: dict[str, Any] = {
        "MISSING": _MISSING,
        "UUID_MATCH": schemas.UUID_TEXT.fullmatch,
        "iso_to_utc_text": schemas.iso_to_utc_text,
        "json_fault": schemas.json_fault,
    }
    lines = [
        "def load_many(items):",
        "    out = []",
        "    append = out.append",
        "    uuids = {}",
        "    for item in items:",
        "        if type(item) is not dict:",
        "            return None",
        "        get = item.get",
    ]
    names = []
    for index, (name, field) in enumerate(schema.load_fields.items()):
        var = f"f{index}"
        names.append((name, var))
        lines += [f"        {line}" for line in _field_code(name, field, var, namespace)]
    record = ", ".join(f"{name!r}: {var}" for name, var in names)
    lines += [f"        append({{{record}}})", "    return out"]
    exec("\n".join(lines), namespace)  # noqa: S102 - source generated above from the schema
    return namespace["load_many"]


def _field_code(name: str, field: fields.Field, var: str, namespace: dict[str, Any]) -> list[str]:
    """Lines that set ``var`` to the loaded value of ``name``, or ``return None``."""
    if field.data_key is not None or (field.validate is not None and not _known(field)):
        raise TypeError(f"field {name!r}: options the fast path does not compile")
    code = [f"v = get({name!r}, MISSING)"]
    if field.required:
        code += ["if v is MISSING:", "    return None"]
    else:
        default = field.load_default
        if default is not None and not isinstance(default, (int, float, str)):
            raise TypeError(f"field {name!r}: default {default!r} is not a constant")
        code += ["if v is MISSING:", f"    {var} = {default!r}"]
    code += ["elif v is None:", f"    {var} = None" if field.allow_none else "    return None"]
    code += ["else:"] + [f"    {line}" for line in _check_code(name, field, namespace)]
    code += [f"    {var} = v"]
    return code


def _known(field: fields.Field) -> bool:
    """Whether every validator of ``field`` is one :func:`_check_code` compiles."""
    return all(isinstance(v, (validate.Range, validate.OneOf)) for v in field.validators)


def _check_code(name: str, field: fields.Field, namespace: dict[str, Any]) -> list[str]:
    """Lines that check and convert a non-null ``v`` for ``field`` (or ``return None``)."""
    if isinstance(field, schemas.Text):
        return _text_code(field)
    if isinstance(field, schemas.UuidText):
        return [
            "u = uuids.get(v) if type(v) is str else None",
            "if u is None:",
            "    if type(v) is not str or not UUID_MATCH(v):",
            "        return None",
            "    u = uuids[v] = v.lower()",
            "v = u",
        ]
    if isinstance(field, schemas.Count):
        return ["if type(v) is not int:", "    return None", *_range_code(field)]
    if isinstance(field, schemas.Fraction):
        return [
            "if type(v) is not int and type(v) is not float:",
            "    return None",
            "v = float(v)",
            "if v != v:",  # NaN
            "    return None",
            *_range_code(field),
        ]
    if isinstance(field, schemas.UtcTimestamp):
        return [
            "if type(v) is not str:",
            "    return None",
            "try:",
            "    v = iso_to_utc_text(v)",
            "except ValueError:",
            "    return None",
            "if v is None:",
            "    return None",
        ]
    if isinstance(field, schemas.JsonObject):
        return [
            "if type(v) is not dict or json_fault(v) is not None:",
            "    return None",
            "v = dict(v)",
        ]
    if type(field) is fields.String and len(field.validators) == 1:
        [one_of] = field.validators
        if isinstance(one_of, validate.OneOf):
            allowed = f"ALLOWED_{name}"
            namespace[allowed] = frozenset(one_of.choices)
            return [f"if type(v) is not str or v not in {allowed}:", "    return None"]
    raise TypeError(f"field {name!r}: {type(field).__name__} is not compiled by the fast path")


def _range_code(field: fields.Field) -> list[str]:
    """The field's Range validator as a comparison (none if it has no Range)."""
    code = []
    for rule in field.validators:
        if isinstance(rule, validate.Range):
            if rule.min is not None:
                op = ">=" if rule.min_inclusive else ">"
                code += [f"if not v {op} {rule.min!r}:", "    return None"]
            if rule.max is not None:
                op = "<=" if rule.max_inclusive else "<"
                code += [f"if not v {op} {rule.max!r}:", "    return None"]
    return code


def _text_code(field: schemas.Text) -> list[str]:
    code = ["if type(v) is not str:", "    return None"]
    if field.max_bytes is not None:
        code += [
            "if v.isascii():",
            "    n = len(v)",
            "else:",
            "    try:",
            "        n = len(v.encode('utf-8'))",
            "    except UnicodeEncodeError:",
            "        return None",
            f"if n > {field.max_bytes}:",
            "    return None",
        ]
    else:
        code += [
            "if not v.isascii():",
            "    try:",
            "        v.encode('utf-8')",
            "    except UnicodeEncodeError:",
            "        return None",
        ]
    # Same tests as Text's, without building stripped copies: blank means empty or
    # all whitespace; surrounding whitespace shows in the first or last character.
    if not field.blank:
        code += ["if not v or v.isspace():", "    return None"]
    if field.identifier:
        code += ["if v and (v[0].isspace() or v[-1].isspace()):", "    return None"]
    if field.max_chars is not None:
        code += [f"if len(v) > {field.max_chars}:", "    return None"]
    return code
