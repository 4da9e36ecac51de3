"""The narrow channel between the trusted judge and the untrusted candidate process: plain data only.

Standard library only, and self-contained: besides being imported by prime_trl, this file's text is prepended to
the two harnesses (`_judge.py`, `_candidate.py`) that run under ``python -I -S``.

A message is one line of JSON. Values are encoded so that Python's plain built-in types survive the trip:
JSON's null/bool/number/string/array stand for None/bool/int/float/str/list, and every JSON object is a one-key
tag: ``{"$t": [...]}`` tuple, ``{"$s": [...]}`` set, ``{"$f": [...]}`` frozenset, ``{"$d": [[k, v], ...]}`` dict,
``{"$b": "hex"}`` bytes, ``{"$c": [re, im]}`` complex, ``{"$i": "hex"}`` an int too long for decimal, ``{"$m":
"name"}`` a module, ``{"$h": n}`` a handle (an object that stays in the candidate's process, see `_judge.Remote`).

Decoding never trusts the sender: the line is length-capped by the reader, `json.loads` is linear in its input
and stops at the interpreter's recursion limit, and `decode` walks at most `MAX_DEPTH` levels, so a hostile line
costs at most a bounded parse and raises `WireError`.
"""

import json

MAX_DEPTH = 64  # nesting levels of a decoded value; real test values are far shallower
_SMALL_INT_BITS = 60  # larger ints travel as hex: no decimal-conversion limit, linear cost


class WireError(ValueError):
    """A message that is not well-formed plain data (too large, too deep, malformed)."""


def encode(value, handle_of, depth=0):
    """`value` as JSON-able data. Exact plain types and their subclasses (as the base type's value) are copied;
    anything else goes through ``handle_of(value)``, which returns a JSON-able tag or raises TypeError."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested deeper than " + str(MAX_DEPTH) + " levels")
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):  # bool handled above
        number = int.__int__(value)
        return number if number.bit_length() <= _SMALL_INT_BITS else {"$i": format(number, "x")}
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, complex):
        return {"$c": [complex.__complex__(value).real, complex.__complex__(value).imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"$b": bytes(value).hex()}
    depth += 1
    if isinstance(value, list):
        return [encode(item, handle_of, depth) for item in list.__iter__(value)]
    if isinstance(value, tuple):
        return {"$t": [encode(item, handle_of, depth) for item in tuple.__iter__(value)]}
    if isinstance(value, frozenset):
        return {"$f": [encode(item, handle_of, depth) for item in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"$s": [encode(item, handle_of, depth) for item in set.__iter__(value)]}
    if isinstance(value, dict):
        return {"$d": [[encode(k, handle_of, depth), encode(v, handle_of, depth)] for k, v in dict.items(value)]}
    return handle_of(value)


def decode(data, make_handle, make_module, depth=0):
    """The inverse of `encode` for untrusted `data` (already JSON-parsed); raises WireError on anything else."""
    if depth > MAX_DEPTH:
        raise WireError("value nested deeper than " + str(MAX_DEPTH) + " levels")
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is float or kind is str:
        return data
    depth += 1
    if kind is list:
        return [decode(item, make_handle, make_module, depth) for item in data]
    if kind is not dict or len(data) != 1:
        raise WireError("malformed value")
    ((tag, body),) = data.items()
    try:
        if tag in ("$t", "$s", "$f") and type(body) is list:
            items = [decode(item, make_handle, make_module, depth) for item in body]
            return tuple(items) if tag == "$t" else set(items) if tag == "$s" else frozenset(items)
        if tag == "$d" and type(body) is list:
            pairs = {}
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise WireError("malformed dict item")
                pairs[decode(pair[0], make_handle, make_module, depth)] = decode(
                    pair[1], make_handle, make_module, depth
                )
            return pairs
        if tag == "$b" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "$c" and type(body) is list and len(body) == 2:
            return complex(float(body[0]), float(body[1]))
        if tag == "$i" and type(body) is str:
            return int(body, 16)
        if tag == "$h" and type(body) is int:
            return make_handle(body)
        if tag == "$m" and type(body) is str:
            return make_module(body)
    except (TypeError, ValueError, OverflowError) as exc:  # unhashable set item / dict key, bad hex, ...
        raise WireError("malformed value: " + type(exc).__name__) from None
    raise WireError("unknown tag")


def loads(line):
    """Parse one untrusted JSON line (bytes or str) into JSON data; WireError instead of any parser failure."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError, MemoryError, TypeError) as exc:
        raise WireError("not a JSON line: " + type(exc).__name__) from None


def dumps(message):
    """One message as a line of bytes."""
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def c_codec():
    """(dumps, loads) like the functions above, built only from the json module's C parts: a program that
    patches builtins (``builtins.isinstance = ...``) in the candidate's process does not break the channel."""
    import json.decoder
    import json.encoder
    import json.scanner

    encoder = json.encoder.c_make_encoder(
        None, None, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    scanner = json.scanner.c_make_scanner(json.decoder.JSONDecoder())
    join, error = "".join, WireError

    def c_dumps(message):
        return (join(encoder(message, 0)) + "\n").encode()

    def c_loads(line):
        try:
            text = line.decode()
            value, end = scanner(text, 0)
        except BaseException:  # noqa: BLE001 - StopIteration, RecursionError, UnicodeDecodeError, ...
            raise error("not a JSON line") from None
        if end != len(text):
            raise error("not a JSON line")
        return value

    return c_dumps, c_loads


class LineReader:
    """Reads newline-terminated messages from a pipe, each at most `max_bytes`, within a deadline."""

    def __init__(self, fd, max_bytes):
        self.fd, self.max_bytes, self.buffer = fd, max_bytes, b""

    def read_line(self, deadline=None):
        """The next line (without its newline); WireError if it is too long, TimeoutError past the deadline,
        EOFError when the writer has gone."""
        import os
        import select
        import time

        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 1 :]
                return line
            if len(self.buffer) > self.max_bytes:
                raise WireError("message longer than " + str(self.max_bytes) + " bytes")
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                    raise TimeoutError("no answer before the deadline")
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise EOFError("the other side closed the channel")
            self.buffer += chunk
