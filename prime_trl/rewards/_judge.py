"""Judge side of a test-program run: runs the row's tests, in a process the candidate cannot reach.

`sandbox.py` starts it as ``python -I -S -B -c <_wire.py + this text>`` next to (not inside) the candidate's
bubblewrap sandbox; argv holds three pipe fds: requests to the candidate (write), its replies (read), and the
verdict to the trainer (write, never given to the candidate). The candidate runs in another PID, mount, IPC and
network namespace, so it cannot see, signal, trace or write into this process; its only influence is the bytes
of its replies, which are decoded as plain data (`_wire.decode`: size-capped by the reader, depth-capped) or
else end the run as a failure.

The job (stdin): the test program, the trusted prompt code (``prelude``: HumanEval's imports and helpers) and
the entry point. Set-up of the tests' namespace, in this order:

1. the module-level names that the test program refers to (and the entry point) and that the candidate
   defines: plain data is copied; functions, classes and other objects become `Remote` handles, so calling one
   sends the arguments to the candidate and brings back the return value as plain data;
2. the prelude runs here, so the prompt's own helper functions (and imports) replace any the candidate
   defined: a completion that redefines a helper cannot change what the tests compute;
3. the entry point, and any function the prelude only has as a stub (``stubs`` in the job: a docstring or
   ``pass`` body, found by the trainer), is bound to the candidate's again.

Then the test program runs; the verdict is "passed" only if it returns normally and the channel never broke.
"""

# ruff: noqa: F821 - encode, decode, loads, dumps, c_codec, LineReader, WireError come from _wire.py,
# whose text sandbox.py prepends to this file

import os
import sys


class CandidateGone(BaseException):
    """The candidate died, timed out or answered with something that is not plain data. A BaseException, so
    tests that catch Exception around a call cannot swallow it."""


class RemoteError(Exception):
    """An exception raised in the candidate whose type is not a built-in exception."""


class Remote:
    """An object that lives in the candidate's process: it can be called, its attributes read and it can be
    iterated, each one round trip. It compares by identity (the candidate's ``__eq__`` never runs on this side)
    and has no truth value, so ``assert candidate(x)`` needs plain data, not an object that claims to be true."""

    __slots__ = ("_channel", "_number")

    def __init__(self, channel, number):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_number", number)

    def __call__(self, *args, **kwargs):
        return self._channel.request({"op": "call", "h": self._number}, args=args, kwargs=kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._channel.request({"op": "getattr", "h": self._number, "name": name})

    def __iter__(self):
        return iter(self._channel.request({"op": "iter", "h": self._number, "limit": 1 << 20}))

    def __bool__(self):
        raise TypeError("a candidate object has no truth value here: the solution must return plain data")

    def __repr__(self):
        return "<candidate object #" + str(self._number) + ">"


# Modules the candidate's globals may name; the judge imports its own copy (never the candidate's).
_MODULES = frozenset(
    "array bisect calendar cmath collections copy datetime decimal enum fractions functools hashlib heapq "
    "itertools json math numbers operator random re statistics string struct sys textwrap time typing "
    "unicodedata".split()
)


class Channel:
    def __init__(self, request_fd, reply_fd, max_bytes):
        import select
        import time

        self.request_fd, self.select, self.clock = request_fd, select.select, time.monotonic
        self.reader = LineReader(reply_fd, max_bytes)
        self.deadline = None
        self.broken = None  # (status, reason) once the candidate is unusable
        os.set_blocking(request_fd, False)

    def fail(self, status, reason):
        self.broken = self.broken or (status, reason)
        raise CandidateGone(reason)

    def receive(self):
        """The candidate's next message (a dict), or CandidateGone."""
        try:
            message = loads(self.reader.read_line(self.deadline))
        except TimeoutError:
            self.fail("timeout", "the candidate did not answer in time")
        except EOFError:
            self.fail("crashed", "the candidate process ended")
        except WireError as exc:
            self.fail("failed", "unusable answer from the candidate: " + str(exc))
        if type(message) is not dict:
            self.fail("failed", "unusable answer from the candidate: not a message")
        return message

    def request(self, message, args=None, kwargs=None):
        """Send one request and return the decoded value, or raise the candidate's exception here."""
        if self.broken:
            raise CandidateGone(self.broken[1])
        if args is not None:
            message["args"] = encode(list(args), self.handle_of)
            message["kwargs"] = encode(dict(kwargs), self.handle_of)
        data = dumps(message)
        while data:
            remaining = self.deadline - self.clock()
            if remaining <= 0 or not self.select([], [self.request_fd], [], remaining)[1]:
                self.fail("timeout", "the candidate did not take the request in time")
            try:
                data = data[os.write(self.request_fd, data) :]
            except OSError:
                self.fail("crashed", "the candidate process ended")
        reply = self.receive()
        if "value" in reply:
            try:
                value = decode(reply["value"], self.make_remote, self.make_module)
                if args is not None and "mutated" in reply:
                    self.update_arguments(args, reply["mutated"])
                return value
            except WireError as exc:
                self.fail("failed", "unusable answer from the candidate: " + str(exc))
        if "raise" in reply and type(reply["raise"]) is str:
            if reply.get("fatal") is not False:
                self.fail("failed", "the candidate raised " + reply["raise"][:100] + " (not an Exception)")
            raise _remote_exception(reply["raise"], reply.get("message"))
        self.fail("failed", "unusable answer from the candidate: malformed reply")

    def update_arguments(self, args, mutated):
        """Apply in-place changes the call made to list, dict and set arguments to the judge's own objects."""
        if type(mutated) is not list:
            raise WireError("malformed mutation list")
        for item in mutated:
            if type(item) is not list or len(item) != 2 or type(item[0]) is not int or not 0 <= item[0] < len(args):
                raise WireError("malformed mutation")
            target, value = args[item[0]], decode(item[1], self.make_remote, self.make_module)
            if type(target) is not type(value) or type(target) not in (list, dict, set):
                raise WireError("mutation of another type")
            if type(target) is list:
                target[:] = value
            else:
                target.clear()
                target.update(value)

    def handle_of(self, value):
        if type(value) is Remote and value._channel is self:
            return {"$h": value._number}
        raise TypeError(
            "cannot pass a " + type(value).__name__ + " to the candidate: only plain data and the candidate's own "
            "objects cross the process boundary"
        )

    def make_remote(self, number):
        return Remote(self, number)

    def make_module(self, name):
        if name not in _MODULES:
            raise WireError("module " + name[:50] + " is not shared with the tests")
        return __import__(name)


def _remote_exception(name, message):
    import builtins

    kind = getattr(builtins, name, None) if name.isidentifier() else None
    text = message[:200] if type(message) is str else ""
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(text)
        except BaseException:  # noqa: BLE001 - types with other constructor signatures
            pass
    return RemoteError(name[:100] + ": " + text)


def _referenced_names(code):
    """Every global (and attribute) name the code, or code nested in it, mentions."""
    names, stack = set(), [code]
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(const for const in current.co_consts if type(const) is type(current))
    return names


def _describe(exc, where):
    lineno, tb = 0, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<tests>":
            lineno = tb.tb_lineno
        tb = tb.tb_next
    try:
        text = str(exc)[:200]
    except BaseException:  # noqa: BLE001 - an exception whose __str__ fails
        text = ""
    return (
        type(exc).__name__ + " at " + where + (" line " + str(lineno) if lineno else "") + (": " + text if text else "")
    )


def _judge():
    import builtins
    import resource
    import signal

    request_fd, reply_fd, verdict_fd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    chunks = []
    while chunk := os.read(0, 1 << 20):
        chunks.append(chunk)
    job = loads(b"".join(chunks))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # the tests' own prints

    def verdict(passed, status, detail=""):
        data = dumps({"passed": passed, "status": status, "detail": detail[:500]})
        while data:
            data = data[os.write(verdict_fd, data) :]
        os._exit(0)

    timeout, startup = job["timeout"], job["startup_seconds"]
    resource.setrlimit(resource.RLIMIT_AS, (job["memory_bytes"], job["memory_bytes"]))
    cpu = int(timeout + startup) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    # The tests run in this (main) thread; a loop in them that never calls the candidate ends here.
    signal.signal(signal.SIGALRM, lambda *_: verdict(False, "timeout", "the tests did not finish in time"))
    signal.setitimer(signal.ITIMER_REAL, timeout + startup + 1)

    try:
        tests = compile(job["tests"], "<tests>", "exec", dont_inherit=True, optimize=0)
        prelude, stubs = job.get("prelude") or None, set(job.get("stubs") or ())
        if prelude is not None:
            prelude = compile(prelude, "<prompt>", "exec", dont_inherit=True, optimize=0)
    except BaseException as exc:  # noqa: BLE001
        verdict(False, "error", "the test program does not compile: " + type(exc).__name__ + ": " + str(exc)[:200])
    entry_point = job.get("entry_point") or None

    channel = Channel(request_fd, reply_fd, job["max_message_bytes"])
    channel.deadline = channel.clock() + timeout + startup
    try:
        hello = channel.receive()
    except CandidateGone:
        status, reason = channel.broken
        verdict(False, status, reason)
    if "error" in hello:
        verdict(False, "error", "the solution does not compile: " + str(hello["error"])[:300])
    if hello.get("ready") is not True:
        verdict(False, "failed", "the solution raised " + str(hello.get("raised"))[:100] + " while it was loading")

    channel.deadline = channel.clock() + timeout
    wanted = {name for name in _referenced_names(tests) if not name.startswith("__") and not hasattr(builtins, name)}
    own = stubs | ({entry_point} if entry_point else set())  # what the candidate supplies despite the prelude
    wanted |= own
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    where = "set-up"
    try:
        values = channel.request({"op": "get", "names": sorted(wanted)}) if wanted else {}
        if type(values) is not dict:
            channel.fail("failed", "unusable answer from the candidate: names")
        namespace.update({name: value for name, value in values.items() if type(name) is str and name in wanted})
        if prelude is not None:
            where = "prompt code"
            exec(prelude, namespace)
            namespace.update({name: values[name] for name in own if name in values})
        where = "tests"
        exec(tests, namespace)
    except CandidateGone:
        status, reason = channel.broken
        verdict(False, status, reason)
    except BaseException as exc:  # noqa: BLE001 - every way out but a normal return is a failure
        if channel.broken:
            verdict(False, *channel.broken)
        verdict(False, "failed", _describe(exc, where))
    if channel.broken:  # a test caught CandidateGone (it catches BaseException): still a failure
        verdict(False, *channel.broken)
    verdict(True, "passed")


if __name__ == "__main__":
    _judge()
