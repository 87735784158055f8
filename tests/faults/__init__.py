"""The fault campaign: real processes on 127.0.0.1 (mitmdump with the addon, the auth server,
the shop, FerretDB) under the faults a proxy at the edge meets, with one table of results.

    python -m tests.faults            # the full campaign (about 20 minutes on 2 cores)
    python -m tests.faults --quick    # the short form CI runs (a few minutes)
    python -m tests.faults --only outage --only sigkill

Each row starts its own stack (scenarios.procs.local_stack), drives load through it while the
fault happens, stops it cleanly (or kills it), and reads back what the store holds:

- *requests failed*: requests that should have been served and were not (no answer, or an
  answer other than the one expected; a 503 a fail-closed policy gives on purpose is not a
  failure where the row says so);
- *documents lost*: requests the proxy answered whose `requests` document never reached the
  store (after the clean stop, or after the next proxy run delivered what a killed one left);
- *proxy kept serving*: the requests of a healthy tenant were answered throughout.

Each row also checks the criterion of issue 9 it stands for ("ok" or "FAILS: ..." in its notes);
the exit status is 1 when a row fails its criterion.
"""
