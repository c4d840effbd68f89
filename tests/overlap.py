"""Two sampler runs made to overlap: the patched run pauses after its first step, its patch installed, until
the plain run is done. With the module lock the plain run waits (the pause times out), so that without the
lock the plain run would sample on the patched module."""
from __future__ import annotations

import threading


def overlapping(patched_run, plain_run, pause: float = 1.0) -> tuple:
    """(patched result, plain result); ``patched_run(progress)`` takes a progress callback, ``plain_run()``
    nothing. Errors in either thread are raised here (an assertion in a thread would be lost)."""
    in_loop, plain_done = threading.Event(), threading.Event()
    results, errors = {}, []

    def pause_once(step, total):
        if step == 1:
            in_loop.set()
            plain_done.wait(timeout=pause)

    def patched():
        try:
            results["patched"] = patched_run(pause_once)
        except Exception as exc:
            errors.append(exc)

    def plain():
        try:
            assert in_loop.wait(timeout=60)
            results["plain"] = plain_run()
        except Exception as exc:
            errors.append(exc)
        finally:
            plain_done.set()

    threads = [threading.Thread(target=patched), threading.Thread(target=plain)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results["patched"], results["plain"]
