"""The fault-injection soak (`make soak`; a short run is `tests/test_soak.py`).

Pods that log every request they receive flip at random between normal, busy, slow, dead,
restarting and cutting answers (`soak.pods`); a client drives the real router command at
high concurrency with every kind of body (`soak.load`); afterwards both sides' records,
joined by the client's `X-Request-ID`, are checked (`soak.verdict`). `soak.run` ties them
together and is the command line.
"""
