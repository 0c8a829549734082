"""Hypothesis strategies shared by the solver's tests."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def request_traces(draw, *, max_tensors: int, size: st.SearchStrategy[int]) -> list[list]:
    """Valid ``[op, id, bytes]`` traces: each id's first event is its malloc, its second (if
    any) its free; some tensors are never freed."""
    n = draw(st.integers(1, max_tensors))
    sizes = draw(st.lists(size, min_size=n, max_size=n))
    freed = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    order = draw(st.permutations(list(range(n)) + [i for i in range(n) if freed[i]]))
    seen: set[int] = set()
    trace = []
    for i in order:
        trace.append(["free" if i in seen else "malloc", i, sizes[i]])
        seen.add(i)
    return trace
