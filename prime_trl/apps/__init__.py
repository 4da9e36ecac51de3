"""Command-line applications: `prime-trl train|eval|score|demo` (`cli`), evaluation and PRM scoring."""
