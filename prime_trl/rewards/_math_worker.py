"""Math-grading worker process (started by `prime_trl.rewards.math.MathGrader`, never imported).

Runs as `python -c <this file's text> <timeout_seconds> <memory_mb>` and serves one JSON request per stdin line:
``{"id": int, "pred": str, "gold": str}`` -> ``{"id": int, "ok": bool}``. It runs in its own process because
math-verify's own time limits use `signal.alarm`, which works only in a main thread and cannot interrupt
long C-level work (e.g. a huge integer power); here they are a soft first line, and the parent kills this
process when a request exceeds its hard deadline. The worker exits when its stdin closes (parent gone).
"""

import sys

sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # never import modules from the current directory


def _main() -> None:
    import json
    import logging
    import resource
    from functools import lru_cache

    soft_timeout = max(1, int(float(sys.argv[1])) - 1)
    memory_bytes = int(sys.argv[2]) * 1024 * 1024
    if memory_bytes > 0:  # a runaway expansion gets a MemoryError instead of the machine's memory
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    logging.disable(logging.WARNING)  # math-verify logs every timeout; the parent reports what matters

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from sympy import Float, Number

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def parse_boxed(text: str) -> list:
        return parse("\\boxed{" + text + "}", extraction_config=config, parsing_timeout=soft_timeout)

    parse_gold = lru_cache(maxsize=4096)(parse_boxed)  # the K samples of a prompt share one reference answer

    def too_far_apart(gold_value, pred_value) -> bool:
        """math-verify compares floats after rounding to 6 decimals, so 6.72e-5 == 6.73e-5; when a float is
        involved we also require a 1e-4 relative agreement (the tolerance of PRIME's own grader)."""
        if not (isinstance(gold_value, Number) and isinstance(pred_value, Number)):
            return False
        if not (isinstance(gold_value, Float) or isinstance(pred_value, Float)):
            return False
        try:
            a, b = float(gold_value), float(pred_value)
        except (OverflowError, TypeError, ValueError):
            return False
        return abs(a - b) > 1e-4 * max(abs(a), abs(b))

    def grade(pred: str, gold: str) -> bool:
        gold_parsed = parse_gold(gold)
        pred_parsed = parse_boxed(pred)
        if not gold_parsed or not pred_parsed:
            return False
        if not verify(gold_parsed, pred_parsed, timeout_seconds=soft_timeout):
            return False
        return not too_far_apart(gold_parsed[0], pred_parsed[0])

    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for raw in sys.stdin:
        request = json.loads(raw)
        try:
            ok = grade(request["pred"], request["gold"])
        except BaseException:  # noqa: BLE001 - any failure (MemoryError, RecursionError, ...) grades as wrong
            ok = False
        out.write(json.dumps({"id": request["id"], "ok": ok}) + "\n")
        out.flush()


_main()
