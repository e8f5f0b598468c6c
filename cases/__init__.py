"""The inspectors' case store (PostgreSQL): a case per alert, the workflow, the audit trail.

`schema` applies the versioned SQL in `migrations/`; `workflow` names the states and closure
reasons (the database enforces them); `store` reads and moves cases; `sink` fills the store from
the alerts topic. The stream never reads it: cases are the inspectors' side.
"""
