"""Institution profiles, risk scores and the monthly supervision report, from the stream's counters and the case store."""
