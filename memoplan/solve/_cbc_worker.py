"""CBC in a process of its own (``mip_dsa._run_cbc`` says why): reads a pickled
(problem, start, deadline) on stdin, runs ``mip_dsa.cbc_in_this_process`` and writes its result,
pickled, on the stdout it was given. Whatever CBC itself prints goes to stderr."""

import os
import pickle
import sys

from memoplan.solve import mip_dsa


def main() -> None:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # CBC's own prints must not mix with the result
    problem, start, deadline = pickle.load(sys.stdin.buffer)
    result = mip_dsa.cbc_in_this_process(problem, start, deadline)
    pickle.dump(result, out)
    out.flush()


if __name__ == "__main__":
    main()
