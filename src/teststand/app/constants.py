"""Calibration constants files: versioned, checksummed, with their provenance.

A constants file is JSON (readable anywhere, diff-able, small): the method, the per-channel
table with every field of the method's result, the run it came from, the software version, the
operating parameters, the interval of validity and a sha256 over all of that. A file whose
checksum does not match is refused, so constants edited by hand or damaged on the way are never
applied silently.

```json
{"format": "teststand.constants", "format_version": 1, "method": "awc", "run_id": "...",
 "run_file": "...", "software_version": "...", "created_utc": "...", "valid_from": "...",
 "valid_until": null, "parameters": {...}, "attrs": {...},
 "table": {"fields": [["channel", "<u2", []], ...], "rows": [[0, ...], ...]},
 "sha256": "..."}
```
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import __version__
from ..errors import ConstantsError

FORMAT = "teststand.constants"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Constants:
    """A loaded, verified constants file."""

    method: str
    table: NDArray[Any]
    meta: dict[str, Any]
    path: Path

    @property
    def run_id(self) -> str:
        """The run the constants were made from."""
        return str(self.meta.get("run_id", ""))


def plain_json(value: Any) -> Any:
    """``value`` with numpy types as plain Python and NaN/inf as ``None`` (strict JSON)."""
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return [plain_json(v) for v in value.tolist()]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (str, np.str_)):
        return str(value)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    return value


def table_to_json(table: NDArray[Any]) -> dict[str, Any]:
    """A structured array as ``{"fields": [[name, dtype, shape]], "rows": [[...]]}`` (NaN: null)."""
    fields = []
    for name in table.dtype.names or ():
        base, shape = table.dtype[name].base, table.dtype[name].shape
        fields.append([name, base.str, list(shape)])
    rows = [[plain_json(row[name]) for name in table.dtype.names or ()] for row in table]
    return {"fields": fields, "rows": rows}


def table_from_json(data: Any, where: str) -> NDArray[Any]:
    """Inverse of :func:`table_to_json`; raises :class:`ConstantsError` naming ``where``."""
    try:
        dtype = np.dtype([(str(n), np.dtype(str(t)), tuple(s)) for n, t, s in data["fields"]])
        table = np.zeros(len(data["rows"]), dtype=dtype)
        for k, row in enumerate(data["rows"]):
            for name, value in zip(dtype.names or (), row, strict=True):
                kind = dtype[name].base.kind
                if kind == "f":
                    value = np.asarray(
                        [np.nan if v is None else v for v in value]
                        if isinstance(value, list)
                        else (np.nan if value is None else value),
                        dtype=float,
                    )
                table[k][name] = value
    except (KeyError, TypeError, ValueError) as exc:
        raise ConstantsError(f"{where}: table: not a constants table ({exc})") from None
    return table


def _checksum(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def export_constants(
    path: str | Path,
    *,
    method: str,
    table: NDArray[Any],
    run_id: str,
    run_file: str = "",
    parameters: dict[str, Any] | None = None,
    attrs: dict[str, Any] | None = None,
    valid_from: str = "",
    valid_until: str | None = None,
) -> dict[str, Any]:
    """Write a constants file and return its content (with its sha256)."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "run_id": run_id,
        "run_file": run_file,
        "software_version": __version__,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "valid_from": valid_from,
        "valid_until": valid_until,
        "parameters": plain_json(parameters or {}),
        "attrs": plain_json(attrs or {}),
        "table": table_to_json(table),
    }
    payload["sha256"] = _checksum(payload)
    Path(path).write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return payload


def load_constants(path: str | Path, method: str | None = None) -> Constants:
    """Read and verify a constants file; ``method`` (if given) must match.

    Raises:
        ConstantsError: unreadable, not a constants file, another format version, a checksum
            that does not match, or constants of another method.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConstantsError(f"{path}: no such constants file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConstantsError(f"{path}: not a constants file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConstantsError(f"{path}: not a teststand constants file")
    if data.get("format_version") != FORMAT_VERSION:
        raise ConstantsError(
            f"{path}: constants format version {data.get('format_version')!r}, "
            f"this teststand reads version {FORMAT_VERSION}"
        )
    stored = data.pop("sha256", None)
    if stored != _checksum(data):
        raise ConstantsError(f"{path}: checksum mismatch: the file was changed after export")
    if method is not None and data.get("method") != method:
        raise ConstantsError(
            f"{path}: constants of method {data.get('method')!r}, expected {method!r}"
        )
    table = table_from_json(data.get("table"), str(path))
    data["sha256"] = stored
    return Constants(str(data["method"]), table, data, path)
