"""Candidate side of a test-program run: runs *inside* the sandbox, in the same process as the untrusted code.

Nothing here is trusted and nothing here needs to be: this process holds no verdict, no nonce, no expected
value. `sandbox.py` passes ``_wire.py`` + this file's text to ``python -I -S -B -c`` inside bubblewrap, with two
pipe fds in argv: requests from the judge (read) and replies to it (write). Protocol (one JSON line each way):

* it reads the job (the program, limits, uid) from stdin, which then becomes /dev/null; drops privileges and
  sets its rlimits; compiles and runs the program as module ``solution``; then tells the judge
  ``{"ready": true}`` (or ``{"error": ...}`` when it does not compile, ``{"raised": ...}`` when it raised);
* then serves the judge's requests until the judge closes the channel: ``get`` (module-level names),
  ``call`` (a handle with arguments; lists, dicts and sets it changed in place are sent back too), ``getattr``
  and ``iter``. Results travel as plain data (`_wire.encode`);
  objects that are not plain data stay here and travel as numbered handles.

The harness's functions are created with a private copy of the builtins (`sandbox.py` prepends that line) and
encode with the json module's C parts, so a program that patches builtins does not break its own channel.
Whatever the program does to this process (patch this loop, write arbitrary bytes to the reply pipe, exit,
crash), the judge only ever sees data, which it checks itself.
"""

# ruff: noqa: F821 - encode, decode, loads, dumps, c_codec, LineReader, WireError come from _wire.py,
# whose text sandbox.py prepends to this file

import os
import sys


def _serve():
    import builtins

    request_fd, reply_fd = int(sys.argv[1]), int(sys.argv[2])
    c_dumps, c_loads = c_codec()
    write, exit_now = os.write, os._exit
    chunks = []
    while chunk := os.read(0, 1 << 20):
        chunks.append(chunk)
    job = loads(b"".join(chunks))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)

    def send(message):
        data = c_dumps(message)
        while data:
            data = data[write(reply_fd, data) :]

    apply_job_limits(job)  # _limits.py: throw-away uid, rlimits with soft = hard
    max_message_bytes = job["limits"]["max_message_bytes"]

    try:
        # optimize=0 keeps `assert` statements whatever flags the interpreter got
        program = compile(job["code"], "<solution>", "exec", dont_inherit=True, optimize=0)
    except BaseException as exc:  # noqa: BLE001 - SyntaxError, ValueError (NUL bytes), MemoryError, RecursionError
        send({"error": type(exc).__name__ + ": " + str(exc)[:300]})
        exit_now(0)
    del job, chunks
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(program, namespace)
    except BaseException as exc:  # noqa: BLE001 - any way out of the program is reported as such
        send({"raised": type(exc).__name__})
        exit_now(0)
    send({"ready": True})

    handles = []

    def handle_of(value):
        if type(value) is type(os):  # a module: the judge imports its own copy of standard modules
            return {"$m": value.__name__}
        handles.append(value)
        return {"$h": len(handles) - 1}

    def encode_or_handle(value):
        try:
            return encode(value, handle_of)
        except ValueError:  # too deeply nested to copy: the judge may still call or iterate it
            return handle_of(value)

    def make_handle(number):
        if not 0 <= number < len(handles):
            raise WireError("unknown handle")
        return handles[number]

    def make_module(name):
        raise WireError("modules cannot be arguments")

    reader = LineReader(request_fd, max_message_bytes)
    while True:
        try:
            request = c_loads(reader.read_line())
        except BaseException:  # noqa: BLE001 - the judge has finished (EOF) or the channel is unusable
            exit_now(0)
        try:
            op = request["op"]
            if op == "get":
                names = [name for name in request["names"] if name in namespace]
                send({"value": {"$d": [[name, encode_or_handle(namespace[name])] for name in names]}})
                continue
            target = make_handle(request["h"])
            if op == "call":
                args = decode(request["args"], make_handle, make_module)
                kwargs = decode(request["kwargs"], make_handle, make_module)
                result = target(*args, **kwargs)
                reply = {"value": encode(result, handle_of)}
                # Arguments the call changed in place (list.sort(), dict updates): sent back for the judge's copies.
                changed = []
                for index, argument in enumerate(args):
                    if type(argument) in (list, dict, set):
                        after = encode(argument, handle_of)
                        if after != request["args"][index]:
                            changed.append([index, after])
                if changed:
                    reply["mutated"] = changed
                send(reply)
                continue
            elif op == "getattr":
                result = getattr(target, request["name"])
            elif op == "iter":
                result, limit = [], request["limit"]
                for item in target:
                    if len(result) >= limit:
                        raise ValueError("more than " + str(limit) + " items")
                    result.append(item)
            else:
                raise ValueError("unknown request")
            reply = {"value": encode(result, handle_of)}
        except BaseException as exc:  # noqa: BLE001 - the judge re-raises it on its side
            try:
                kind = type(exc)
                reply = {"raise": kind.__name__, "fatal": not issubclass(kind, Exception), "message": str(exc)[:200]}
            except BaseException:  # noqa: BLE001 - a hostile exception type
                reply = {"raise": "Exception", "fatal": True, "message": ""}
        send(reply)


if __name__ == "__main__":
    _serve()
