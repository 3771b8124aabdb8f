"""Sampling a clip's caption candidates in rounds, and the result they make.

`sample_candidates` asks for `n` candidates per record; with structured captions, a candidate
whose answer fails the schema is sampled again (up to `tries` rounds in all). Candidate k's
round r uses seed + k + n * r, so candidate 0's first round is exactly what
`num_candidates: 1` gives with the same seed, and no two samples share a seed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stages.base import StageError
from stages.captioners.structured import Invalid, StructuredCaptions

CANDIDATES = "caption_candidates"  # result keys when num_candidates > 1
SELECTION = "caption_selection"


def sample_candidates(
    generate_round: Callable[[list[tuple[int, int]]], list[Any]],
    records: int,
    n: int,
    structured: StructuredCaptions | None,
    tries: int,
    usage: Counter[str],
) -> tuple[list[dict[int, Any]], list[dict[int, Invalid]], list[StageError | None]]:
    """Per record: valid candidates by number, the still-invalid ones, and a generation error.

    `generate_round(items)` answers a Generation or StageError per (record, seed offset).
    """
    found: list[dict[int, Any]] = [{} for _ in range(records)]
    invalid: list[dict[int, Invalid]] = [{} for _ in range(records)]
    failed: list[StageError | None] = [None] * records
    pending = [(i, k) for i in range(records) for k in range(n)]
    for attempt in range(tries):
        pending = [(i, k) for i, k in pending if failed[i] is None]
        if not pending:
            break
        generations = generate_round([(i, k + n * attempt) for i, k in pending])
        usage["caption_samples"] += len(pending)
        if attempt:
            usage["json_retries"] += len(pending)
        retry = []
        for (i, k), generation in zip(pending, generations, strict=True):
            if isinstance(generation, StageError):
                failed[i] = failed[i] or generation
                continue
            usage["tokens_out"] += generation.tokens_out
            usage["tokens_in"] += generation.tokens_in
            value = generation.text if structured is None else structured.parse(generation.text)
            if isinstance(value, Invalid):
                invalid[i][k] = value
                retry.append((i, k))
            else:
                found[i][k] = value
                invalid[i].pop(k, None)
        pending = retry
    return found, invalid, failed


@dataclass
class Captioned:
    """A record's caption (text, or the parsed object of a structured one), with its candidates."""

    value: str | dict[str, Any]
    candidates: list[Any] | None = None
    selection: dict[str, Any] | None = None

    def result(self, key: str) -> dict[str, Any]:
        out: dict[str, Any] = {key: self.value}
        if self.candidates is not None:
            out[CANDIDATES] = self.candidates
            out[SELECTION] = self.selection
        return out
