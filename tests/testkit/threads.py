"""Run one function on several threads at once and collect what they raise."""
import threading
from typing import Callable


def run_in_threads(work: Callable[[int], None], n: int) -> list[BaseException]:
    """Call ``work(i)`` for ``i in range(n)`` on ``n`` threads released together by a barrier (so they
    really overlap), wait for all of them, and return the exceptions they raised (empty: none did)."""
    start, errors = threading.Barrier(n), []

    def run(i):
        try:
            start.wait()
            work(i)
        except BaseException as e:  # noqa: BLE001 - returned to the test, which asserts on it
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
