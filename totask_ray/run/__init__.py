"""The driver side of a run: its options and context, its steps, the job record, progress."""
