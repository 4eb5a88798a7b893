"""The run ledger: what each run changed, so it can be undone (`undo_run`) and measured (`diff`).

`record` is what the annotator actors write (one append-only JSON-lines file per actor, the task's
"before" written before the write is sent); `store` creates and reads a run's ledger directory;
`undo` restores what a run changed where the task still holds what the run wrote; `diff` compares
what two runs wrote, or a run and what the tasks hold now (after review). `place` is the storage
seam: a ledger on a local disk, or on an object store beside an `s3://` report (part objects).
"""
