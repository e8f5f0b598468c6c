"""The case workflow (EMVS AMS): states, moves, closure reasons.

The database enforces all of it (`migrations/0001_cases.sql`: the `case_transitions` table,
`case_transition()`, CHECK constraints); these names are for help texts, the API's schema and
early, friendly refusals. `tests/cases` checks both agree.
"""

from __future__ import annotations

STATUSES = ("new", "seen", "investigating", "escalated", "closed")

# (from, to): a reason is required
TRANSITIONS: dict[tuple[str, str], bool] = {
    ("new", "seen"): True,
    ("new", "investigating"): False,
    ("new", "closed"): True,
    ("seen", "investigating"): False,
    ("seen", "closed"): True,
    ("investigating", "escalated"): True,
    ("investigating", "closed"): True,
    ("escalated", "investigating"): False,
    ("escalated", "closed"): True,
    ("closed", "new"): True,  # only a case closed as `withdrawn` (the stream reopens it)
}

CLOSURE_REASONS = {
    "confirmed_fraud": "confirmed fraud / recycled drug",
    "process_error": "institution process error",
    "scanner_fault": "scanner or software fault",
    "upload_error": "data upload error",
    "duplicate": "duplicate of another case (duplicate_of names it)",
    "withdrawn": "the alert was withdrawn by later data (set by the stream)",
    "other": "other (a comment of at most 500 characters is required)",
}

COMMENT_MAX = 500
