"""The solve stage: a profile and a configuration in, a plan out.

- ``config.py``: ``SolveConfig`` (sequence, GPUs as dp x cp x tp, hardware, limits).
- ``swap.py``: per-layer swap fractions (alpha) and the cost model (time, MFU).
- ``parallel.py``: what FSDP2 and context parallelism add per GPU (ring attention's
  workspace, sharded model states, FSDP2's buffers).
- ``dsa.py``: dynamic-storage-allocation types, lower bound, greedy-by-size.
- ``mip_dsa.py``: the DSA mixed-integer program (the only module that imports python-mip).
- ``check.py``: the independent checker every plan passes before it is written.
- ``caching_sim.py``: a simulation of PyTorch's caching allocator (the fragmentation baseline).
- ``levels.py``: the bi-level address plan (layer forward/backward, then the iteration).
- ``plan.py``: the driver, ``solve_plan(profile, config) -> Plan``.
"""

from memoplan.solve.config import SolveConfig
from memoplan.solve.plan import solve_plan

__all__ = ["SolveConfig", "solve_plan"]
