"""Reading and writing memoplan's JSON files: atomic writes, clear errors on bad files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from memoplan.errors import MemoplanError


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` so that readers never see a partial file.

    The text goes to a temporary file in the same folder, which then replaces ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (same scheme as :func:`write_json_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path, *, schema_prefix: str, what: str) -> dict:
    """Read a memoplan JSON file whose ``schema`` starts with ``schema_prefix``.

    ``what`` names the file kind in messages ("profile", "plan"). Missing files, text that is not
    JSON, JSON of another kind and unsupported versions all raise :class:`MemoplanError`.
    """
    path = Path(path)
    if not path.is_file():
        raise MemoplanError(f"No {what} file at '{path}'. Check the path.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemoplanError(
            f"'{path}' is not a valid JSON {what} ({e}). The file may be truncated or corrupt: "
            f"write it again with memoplan."
        ) from e
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith(schema_prefix.split("/")[0] + "/"):
        raise MemoplanError(
            f"'{path}' is not a memoplan {what} (its 'schema' field is {schema!r}, expected "
            f"'{schema_prefix}'). Pass a file written by memoplan."
        )
    if schema != schema_prefix:
        raise MemoplanError(
            f"'{path}' is a {what} of schema '{schema}', but this memoplan reads '{schema_prefix}'. "
            f"Write it again with this version of memoplan."
        )
    return data


def load_profile(path: str | Path, what: str = "profile"):
    """A profile file as :class:`memoplan.ir.Profile` (clear errors for bad files; ``what``
    names the expected file in them)."""
    from memoplan.ir import PROFILE_SCHEMA, Profile

    return Profile.from_json(read_json(path, schema_prefix=PROFILE_SCHEMA, what=what))


def load_plan(path: str | Path):
    """A plan file as :class:`memoplan.ir.Plan` (clear errors for bad files)."""
    from memoplan.ir import PLAN_SCHEMA, Plan

    return Plan.from_json(read_json(path, schema_prefix=PLAN_SCHEMA, what="plan"))
