"""Reading a pickle stream without executing it: :func:`parse_pickle_safely`.

``pickle.loads`` imports and calls whatever the stream names, so an untrusted pickle can run
code. This reader never unpickles: it walks the opcodes with ``pickletools.genops`` (which
only parses) and rebuilds plain data itself: dicts, lists, tuples, ints, floats, strings,
bytes, booleans, None and numeric numpy arrays (the values the official CIFAR-10 batches
hold). A name in the stream is kept as a name, never imported; the only calls it accepts
are the three that rebuild those values (``_codecs.encode`` of latin-1 text,
``numpy.dtype`` of a numeric code and ``numpy.core.multiarray._reconstruct`` of a plain
``ndarray``), and it performs them itself. Anything else raises
:class:`RejectedPickleError` (a ``ValueError``).
"""

from __future__ import annotations

import pickletools
from typing import Any

import numpy as np


class RejectedPickleError(ValueError):
    """Pickle bytes this reader refuses: malformed, truncated, or more than plain data."""


class _Global:
    """A name referenced by the pickle (never imported)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


class _ArrayStub:
    """An ndarray being rebuilt; filled in by BUILD."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None


class _DtypeStub:
    def __init__(self, code: str):
        self.code = code
        self.dtype = np.dtype(code)


_RECONSTRUCT = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}
_NUMERIC_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"}
_LITERAL_OPS = {
    "BININT",
    "BININT1",
    "BININT2",
    "LONG1",
    "LONG4",
    "BINFLOAT",
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "SHORT_BINBYTES",
    "BINBYTES",
    "BINBYTES8",
}


def _text(value: Any) -> Any:
    """Python 2 strings arrive as bytes; compare them as text."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _reduce(func: Any, args: Any, where: str) -> Any:
    if not isinstance(func, _Global) or not isinstance(args, tuple):
        raise RejectedPickleError(
            f"{where}: unexpected call in the pickle; only plain data is read"
        )
    target = (func.module, func.name)
    if target == ("_codecs", "encode") and len(args) == 2 and isinstance(args[0], str):
        if args[1] not in ("latin1", "latin-1"):
            raise RejectedPickleError(
                f"{where}: unexpected text encoding {args[1]!r} in the pickle"
            )
        return args[0].encode("latin-1")
    if target in _RECONSTRUCT:
        subtype = args[0] if args else None
        if not isinstance(subtype, _Global) or (subtype.module, subtype.name) != (
            "numpy",
            "ndarray",
        ):
            raise RejectedPickleError(f"{where}: only plain numpy arrays are allowed in the pickle")
        return _ArrayStub()
    if target == ("numpy", "dtype") and args and isinstance(args[0], str | bytes):
        code = _text(args[0])
        if code not in _NUMERIC_DTYPES:
            raise RejectedPickleError(
                f"{where}: array dtype {code!r} is not allowed (numeric only)"
            )
        return _DtypeStub(code)
    raise RejectedPickleError(
        f"{where}: the pickle refers to {func!r}, which plain data never needs; "
        "refusing to read it (the file holds Python objects, or is not what it claims to be)"
    )


def _build(obj: Any, state: Any, where: str) -> None:
    if isinstance(obj, _DtypeStub):
        order = _text(state[1]) if isinstance(state, tuple) and len(state) > 1 else "|"
        if order in ("<", ">"):
            obj.dtype = obj.dtype.newbyteorder(order)
        return
    if isinstance(obj, _ArrayStub) and isinstance(state, tuple) and len(state) == 5:
        _version, shape, dtype, is_fortran, raw = state
        if not isinstance(dtype, _DtypeStub) or not isinstance(raw, bytes):
            raise RejectedPickleError(f"{where}: array with unsupported content in the pickle")
        shape = tuple(int(s) for s in shape)
        needed = int(np.prod(shape)) * dtype.dtype.itemsize
        if needed != len(raw):
            raise RejectedPickleError(
                f"{where}: array data has {len(raw)} bytes, shape {shape} needs {needed}"
            )
        array = np.frombuffer(raw, dtype=dtype.dtype).reshape(
            shape, order="F" if is_fortran else "C"
        )
        obj.array = array
        return
    raise RejectedPickleError(
        f"{where}: unexpected object state in the pickle; only plain data is read"
    )


def _resolve(value: Any) -> Any:
    if isinstance(value, _ArrayStub):
        if value.array is None:
            raise RejectedPickleError("an array in the pickle has no data")
        return value.array
    if isinstance(value, dict):
        return {_resolve(k): _resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v) for v in value)
    return value


def parse_pickle_safely(data: bytes, where: str = "pickle") -> Any:
    """Rebuild plain data (dict, list, tuple, int, float, str, bytes, bool, None, numeric
    ndarray) from pickle bytes without unpickling: opcodes are read with
    ``pickletools.genops`` and interpreted here; nothing is imported or called.
    Python 2 ``str`` values come back as ``bytes``. Anything else raises ``ValueError``.
    """
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        if not marks:
            raise RejectedPickleError(f"{where}: malformed pickle (no MARK)")
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    try:
        for opcode, arg, _pos in pickletools.genops(data):
            op = opcode.name
            if op in ("PROTO", "FRAME"):
                continue
            if op == "STOP":
                break
            if op in _LITERAL_OPS:
                stack.append(arg)
            elif op in ("SHORT_BINSTRING", "BINSTRING"):  # Python 2 str
                stack.append(arg.encode("latin-1"))
            elif op == "NONE":
                stack.append(None)
            elif op in ("NEWTRUE", "NEWFALSE"):
                stack.append(op == "NEWTRUE")
            elif op == "EMPTY_DICT":
                stack.append({})
            elif op == "EMPTY_LIST":
                stack.append([])
            elif op == "EMPTY_TUPLE":
                stack.append(())
            elif op == "MARK":
                marks.append(len(stack))
            elif op in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = stack[-1]
            elif op == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif op in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo[arg])
            elif op in ("TUPLE1", "TUPLE2", "TUPLE3"):
                size = int(op[-1])
                items = tuple(stack[-size:])
                del stack[-size:]
                stack.append(items)
            elif op == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif op == "LIST":
                stack.append(pop_mark())
            elif op == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2], strict=True)))
            elif op == "APPEND":
                value = stack.pop()
                stack[-1].append(value)
            elif op == "APPENDS":
                items = pop_mark()
                stack[-1].extend(items)
            elif op == "SETITEM":
                value = stack.pop()
                key = stack.pop()
                stack[-1][key] = value
            elif op == "SETITEMS":
                items = pop_mark()
                stack[-1].update(zip(items[::2], items[1::2], strict=True))
            elif op == "GLOBAL":
                module, name = arg.split(" ", 1)
                stack.append(_Global(module, name))
            elif op == "STACK_GLOBAL":
                name = stack.pop()
                module = stack.pop()
                stack.append(_Global(module, name))
            elif op == "REDUCE":
                args = stack.pop()
                func = stack.pop()
                stack.append(_reduce(func, args, where))
            elif op == "BUILD":
                state = stack.pop()
                _build(stack[-1], state, where)
            else:
                raise RejectedPickleError(
                    f"{where}: pickle opcode {op} is not needed for plain data; refusing it"
                )
    except RejectedPickleError:
        raise
    except Exception as exc:  # genops and the stack ops fail in assorted ways on bad input
        raise RejectedPickleError(
            f"{where}: malformed or truncated pickle ({exc}); the file is corrupt"
        ) from exc
    if len(stack) != 1:
        raise RejectedPickleError(f"{where}: malformed or truncated pickle; the file is corrupt")
    return _resolve(stack[0])
