"""Checks of the files lrquant reads, made where they enter.

A damaged input file (truncated by a failed copy, empty, overwritten) would otherwise fail deep
inside a library with a traceback; each check here turns it into one :class:`LrquantError` that
names the file and says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

from lrquant.errors import LrquantError

# What to do about a damaged file, unless the caller knows better (a resume folder is deleted).
REDO = "copy or re-create it"

# magic "GGUF", version (4 bytes), tensor count and metadata count (8 bytes each): every GGUF's start
_GGUF_HEADER_BYTES = 24

_JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


def _unreadable(path: Path, err: OSError) -> LrquantError:
    """The error for a file that exists but cannot be read (permissions, a folder, an I/O error)."""
    return LrquantError(f"cannot read '{path}': {err.strerror or err}")


def read_json(path: Path, advice: str = REDO) -> object:
    """The parsed content of the JSON file ``path``, refused when it is not valid JSON; ``advice``
    ends the message."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LrquantError(
            f"'{path}' is not valid JSON (not UTF-8 at byte {err.start}): it is damaged; {advice}"
        ) from None
    except OSError as err:
        raise _unreadable(path, err) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        reason = str(err) if text.strip() else "the file is empty"
        raise LrquantError(
            f"'{path}' is not valid JSON ({reason}): it is truncated or damaged; {advice}"
        ) from None


def read_json_object(path: Path, what: str, advice: str = REDO) -> dict:
    """The JSON object in ``path``, refused when the file holds another JSON value; ``what`` says what
    the file should be ("a model config")."""
    data = read_json(path, advice)
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), "null")
        raise LrquantError(f"'{path}' is not {what}: it holds {kind}, not a JSON object; {advice}")
    return data


def check_safetensors(path: Path, advice: str = REDO) -> None:
    """Refuse ``path`` unless it is a complete safetensors file; ``advice`` ends the message.

    Opening it reads only the header, and checks that the header is valid and that its tensors
    cover the data section exactly, so a truncated or overwritten file is caught without reading
    the weights.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        # "Error while deserializing header: <reason>": the reason is what helps
        reason = str(err).split(": ", 1)[-1]
        raise LrquantError(
            f"'{path}' is not a valid safetensors file ({reason}): it is truncated or damaged; {advice}"
        ) from None
    except OSError as err:
        raise _unreadable(path, err) from None


def check_gguf(path: Path) -> None:
    """Refuse ``path`` unless it is a complete GGUF file: a valid header, readable metadata and
    tensor table, and every tensor's data inside the file.

    The reader maps the file and reads no tensor data; parsing the metadata of a large vocabulary
    takes a few seconds, paid once, before a conversion that takes far longer.
    """
    from gguf import GGUFReader

    try:
        with path.open("rb") as fh:
            head = fh.read(_GGUF_HEADER_BYTES)
    except OSError as err:
        raise _unreadable(path, err) from None
    if len(head) < _GGUF_HEADER_BYTES:
        raise _bad_gguf(path, f"{len(head)} bytes, shorter than a GGUF header")
    if head[:4] != b"GGUF":
        raise _bad_gguf(path, "it does not start with 'GGUF'")
    try:
        reader = GGUFReader(path)
    except OSError as err:
        raise _unreadable(path, err) from None
    except (ValueError, KeyError, IndexError) as err:
        # When a field or the tensor data runs past the end of the file the reader fails with
        # whatever numpy says (a short slice, a failed reshape); its message is all there is.
        raise _bad_gguf(path, f"metadata or tensors unreadable: {type(err).__name__}: {err}") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise _bad_gguf(
                path, f"tensor '{tensor.name}' ends at byte {end}, past the end of the file ({size})"
            )


def _bad_gguf(path: Path, reason: str) -> LrquantError:
    return LrquantError(f"'{path}' is not a valid GGUF file ({reason}): it is truncated or damaged; {REDO}")
