"""Parse accuracy of the rule-based constraint parser on the hand-written prompt table.

A prompt counts as parsed when its entities, attribute bindings and relations all equal the
table's (``benchmarks/parse_table.py``: T2I-CompBench-style colour, shape, texture and spatial
prompts) and on its ``HELD_OUT`` rows, written after the parser was done. Prints JSON: accuracy
overall and per category, and the prompts that failed.

    python -m benchmarks.parse_accuracy
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from benchmarks.parse_table import HELD_OUT, TABLE
from benchmarks.timing import print_json
from editkit.constraints import Constraints, parse_rules


def summarize(constraints: Constraints) -> tuple[str, str, str]:
    """Entities, bindings and relations of parsed constraints in the table's ``|``-joined notation."""
    return (
        "|".join(e.text for e in constraints.entities),
        "|".join(f"{b.attribute.text}>{b.entity.text}" for b in constraints.bindings),
        "|".join(f"{r.subject.text} {r.relation} {r.object.text}" for r in constraints.relations),
    )


def parse_accuracy(parser: Callable[[str], Constraints] = parse_rules, table=TABLE) -> dict:
    """Exact-match accuracy of ``parser`` over ``table`` (default ``TABLE``), overall and per category."""
    total, correct, failures = Counter(), Counter(), []
    for category, prompt, *expected in table:
        total[category] += 1
        got = summarize(parser(prompt))
        if got == tuple(expected):
            correct[category] += 1
        else:
            failures.append({"prompt": prompt, "expected": expected, "got": list(got)})
    return {
        "prompts": sum(total.values()),
        "accuracy": sum(correct.values()) / sum(total.values()),
        "per_category": {name: correct[name] / count for name, count in total.items()},
        "failures": failures,
    }


def main() -> None:
    result = {"benchmark": "parse_accuracy", "parser": "rules", "table": parse_accuracy()}
    result["held_out"] = parse_accuracy(table=HELD_OUT)
    print_json(result)


if __name__ == "__main__":
    main()
