"""Runtimes a target ships that differ from the host's: each module runs an artifact there.

A runtime module defines:
    available() -> str | None        None when it can run here, else the one-line reason
    environment() -> dict            what its results depend on (versions), for the cache key
    session(artifact, threads)       a session (a context manager) with run_many(feeds) ->
                                     [[outputs]], latency(feed, warmup, runs) -> [ms] and
                                     describe() -> str (runtime, version, backend, threads)

conf/target/<name>.yaml maps a format to one (`runtime: {onnx: browser}`).
"""
