"""Typed records shared by the stages (profile -> solve -> emit -> runtime).

Frozen, keyword-only dataclasses; sizes are integer bytes, times seconds, FLOPs counts.
Each record converts to and from plain JSON data (``to_json`` / ``from_json``); nothing else in
memoplan builds these dicts by hand. ``PROFILE_SCHEMA`` versions the profile file
(documented in docs/profile-schema.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from memoplan.errors import MemoplanError

PROFILE_SCHEMA = "memoplan.profile/1"

SavedKind = Literal["input", "mixing_output", "other", "shared"]
TensorRole = Literal["transient", "skeletal", "output", "grad"]


@dataclass(frozen=True, kw_only=True)
class SizeLaw:
    """A count as a polynomial in sequence length S: ``sum(c_i * S**i)``.

    ``exact`` says whether the polynomial reproduced every profiled length exactly;
    ``max_rel_error`` is its worst relative error on them.
    """

    coeffs: tuple[float, ...]
    exact: bool = True
    max_rel_error: float = 0.0

    def at(self, seq: int) -> float:
        """Value at sequence length ``seq`` (not rounded)."""
        return float(sum(c * seq**i for i, c in enumerate(self.coeffs)))

    def bytes_at(self, seq: int) -> int:
        """Value at ``seq`` rounded to whole bytes (never negative)."""
        return max(0, round(self.at(seq)))

    @property
    def per_token(self) -> float:
        """The linear coefficient (bytes or FLOPs per token)."""
        return self.coeffs[1] if len(self.coeffs) > 1 else 0.0

    @property
    def degree(self) -> int:
        return max((i for i, c in enumerate(self.coeffs) if c != 0), default=0)

    def to_json(self) -> dict:
        return {"coeffs": list(self.coeffs), "exact": self.exact, "max_rel_error": self.max_rel_error}

    @classmethod
    def from_json(cls, d: dict) -> SizeLaw:
        return cls(coeffs=tuple(float(c) for c in d["coeffs"]), exact=bool(d["exact"]),
                   max_rel_error=float(d.get("max_rel_error", 0.0)))


@dataclass(frozen=True, kw_only=True)
class SavedTensor:
    """One storage saved for backward by the layer (parameters excluded).

    ``kind``: ``input`` (the layer's hidden-state input), ``mixing_output`` (made by a
    token-mixing op such as attention), ``shared`` (another layer argument that every layer
    shares, e.g. RoPE tables: counted once, not per layer), or ``other``.
    ``token_wise``: an ``other`` tensor that can be recomputed for any subset of tokens from the
    layer input, the shared inputs and the mixing outputs (always False for the other kinds,
    which are kept whole). ``seq_axis`` is the token axis of ``shape`` (None if it has none).
    """

    name: str
    tensor_id: int
    kind: SavedKind
    token_wise: bool
    producer: str
    shape: tuple[int, ...]
    dtype: str
    seq_axis: int | None
    bytes: int
    bytes_per_token: float
    law: SizeLaw
    segment: int | None = None
    autograd_saved: bool = True   # False for a layer input kept only to recompute from
    # dense with its tokens outermost in memory: its first k tokens are a prefix of its buffer,
    # so the copied tokens can arrive early and the recomputed ones be placed right after them
    token_outer: bool = False


@dataclass(frozen=True, kw_only=True)
class TensorSpan:
    """One allocation (a storage) of the layer's forward or backward.

    ``role``: ``transient`` (created and freed in the same phase), ``skeletal`` (created in
    forward, freed in backward), ``output`` (the layer's output, handed to the next layer) or
    ``grad`` (gradients the backward returns).
    """

    id: int
    name: str
    phase: Literal["forward", "backward"]
    role: TensorRole
    bytes: int
    law: SizeLaw


@dataclass(frozen=True, kw_only=True)
class Segment:
    """A maximal token-wise region of the forward graph (fx node names)."""

    id: int
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class GraphNode:
    """One node of the layer's forward graph: its op, class and token axes.

    ``cls``: ``token`` (token-wise), ``mixing``, ``free`` (touches no token axis), or
    ``placeholder`` (an input: parameter, buffer, layer argument, grad output). ``axes``:
    for each tensor output, the axes that grow with the sequence length. The runtime checks its
    own trace of the layer against these before it executes a plan. ``args``/``kwargs`` are the
    call's arguments as JSON data (``memoplan.trace.encode``), ``role`` a placeholder's role
    (param, buffer, primary, shared, grad_out), ``output`` whether the layer returns the value.
    """

    name: str
    target: str
    cls: str
    axes: tuple[tuple[int, ...], ...]
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    role: str = ""
    output: bool = False


@dataclass(frozen=True, kw_only=True)
class FlopSplit:
    """FLOPs of one phase at the profiled length, split by token-wise vs token-mixing ops."""

    token_wise: int
    mixing: int
    token_wise_law: SizeLaw
    mixing_law: SizeLaw

    @property
    def total(self) -> int:
        return self.token_wise + self.mixing

    def total_at(self, seq: int) -> float:
        return self.token_wise_law.at(seq) + self.mixing_law.at(seq)


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    file: str
    layer_class: str
    layer_path: str
    num_layers: int
    param_bytes_per_layer: int
    param_bytes_total: int
    dtype: str
    hidden_size: int | None = None
    head_bytes_per_token: float = 0.0   # held outside the layers up to the head phase (trace.head)
    head_bytes_fixed: float = 0.0       # and a part that does not grow with the tokens (a loss
    #                                     computed in chunks); older profiles: 0


@dataclass(frozen=True, kw_only=True)
class LayerProfile:
    saved: tuple[SavedTensor, ...]
    tensors: tuple[TensorSpan, ...]
    requests_forward: tuple[tuple[str, int, int], ...]
    requests_backward: tuple[tuple[str, int, int], ...]
    peak_forward: int
    peak_backward: int
    segments: tuple[Segment, ...]
    mixing_ops: tuple[str, ...]
    flops_forward: FlopSplit
    flops_backward: FlopSplit
    time_forward_s: float
    time_backward_s: float
    graph_nodes: int
    nodes: tuple[GraphNode, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Everything the solver needs about one model: see docs/profile-schema.md."""

    model: ModelInfo
    layer: LayerProfile
    seq_len: int
    seq_lens: tuple[int, ...]
    time_source: Literal["measured", "estimated"]
    hardware: str
    device: str
    notes: tuple[str, ...] = ()
    schema: str = PROFILE_SCHEMA
    hash: str = ""
    # tensors that the solver must treat specially are reachable from the methods below

    def saved_bytes_per_token(self, kind: str | None = None) -> float:
        return sum(t.bytes_per_token for t in self.layer.saved if kind is None or t.kind == kind)

    def to_json(self) -> dict:
        return _profile_to_json(self)

    @classmethod
    def from_json(cls, d: dict) -> Profile:
        try:
            return _profile_from_json(d)
        except (KeyError, TypeError, ValueError) as e:
            raise MemoplanError(
                f"The profile file is incomplete or malformed ({type(e).__name__}: {e}). "
                f"Run 'memoplan profile' again to write a fresh one."
            ) from e


def _law(d: dict) -> SizeLaw:
    return SizeLaw.from_json(d)


def _profile_to_json(p: Profile) -> dict:
    L = p.layer

    def split(f: FlopSplit) -> dict:
        return {"token_wise": f.token_wise, "mixing": f.mixing, "total": f.total,
                "token_wise_law": f.token_wise_law.to_json(), "mixing_law": f.mixing_law.to_json()}

    return {
        "schema": p.schema,
        "hash": p.hash,
        "model": asdict(p.model),
        "seq_len": p.seq_len,
        "seq_lens": list(p.seq_lens),
        "time_source": p.time_source,
        "hardware": p.hardware,
        "device": p.device,
        "notes": list(p.notes),
        "layer": {
            "saved": [
                {**{k: v for k, v in asdict(t).items() if k != "law"}, "shape": list(t.shape),
                 "law": t.law.to_json()}
                for t in L.saved
            ],
            "tensors": [{**{k: v for k, v in asdict(t).items() if k != "law"}, "law": t.law.to_json()}
                        for t in L.tensors],
            "requests": {"forward": [list(r) for r in L.requests_forward],
                         "backward": [list(r) for r in L.requests_backward]},
            "peak": {"forward": L.peak_forward, "backward": L.peak_backward},
            "segments": [{"id": s.id, "nodes": list(s.nodes), "inputs": list(s.inputs),
                          "outputs": list(s.outputs)} for s in L.segments],
            "mixing_ops": list(L.mixing_ops),
            "flops": {"forward": split(L.flops_forward), "backward": split(L.flops_backward)},
            "time": {"forward_s": L.time_forward_s, "backward_s": L.time_backward_s},
            "graph_nodes": L.graph_nodes,
            "nodes": [{"name": n.name, "target": n.target, "class": n.cls,
                       "axes": [list(a) for a in n.axes], "args": n.args, "kwargs": n.kwargs,
                       "role": n.role, "output": n.output} for n in L.nodes],
        },
    }


def _profile_from_json(d: dict) -> Profile:
    ld = d["layer"]

    def split(f: dict) -> FlopSplit:
        return FlopSplit(token_wise=int(f["token_wise"]), mixing=int(f["mixing"]),
                         token_wise_law=_law(f["token_wise_law"]), mixing_law=_law(f["mixing_law"]))

    saved = tuple(
        SavedTensor(**{**{k: v for k, v in t.items() if k not in ("law", "shape")},
                       "shape": tuple(t["shape"]), "law": _law(t["law"])})
        for t in ld["saved"]
    )
    tensors = tuple(TensorSpan(**{**{k: v for k, v in t.items() if k != "law"}, "law": _law(t["law"])})
                    for t in ld["tensors"])
    layer = LayerProfile(
        saved=saved,
        tensors=tensors,
        requests_forward=tuple((str(o), int(i), int(b)) for o, i, b in ld["requests"]["forward"]),
        requests_backward=tuple((str(o), int(i), int(b)) for o, i, b in ld["requests"]["backward"]),
        peak_forward=int(ld["peak"]["forward"]),
        peak_backward=int(ld["peak"]["backward"]),
        segments=tuple(Segment(id=s["id"], nodes=tuple(s["nodes"]), inputs=tuple(s["inputs"]),
                               outputs=tuple(s["outputs"])) for s in ld["segments"]),
        mixing_ops=tuple(ld["mixing_ops"]),
        flops_forward=split(ld["flops"]["forward"]),
        flops_backward=split(ld["flops"]["backward"]),
        time_forward_s=float(ld["time"]["forward_s"]),
        time_backward_s=float(ld["time"]["backward_s"]),
        graph_nodes=int(ld["graph_nodes"]),
        nodes=tuple(GraphNode(name=n["name"], target=n["target"], cls=n["class"],
                              axes=tuple(tuple(a) for a in n["axes"]), args=n.get("args", []),
                              kwargs=n.get("kwargs", {}), role=n.get("role", ""),
                              output=bool(n.get("output", False)))
                    for n in ld.get("nodes", ())),
    )
    return Profile(
        schema=d["schema"],
        hash=d.get("hash", ""),
        model=ModelInfo(**d["model"]),
        layer=layer,
        seq_len=int(d["seq_len"]),
        seq_lens=tuple(int(s) for s in d["seq_lens"]),
        time_source=d["time_source"],
        hardware=d["hardware"],
        device=d["device"],
        notes=tuple(d.get("notes", ())),
    )


# ---- the plan (written by ``memoplan solve``; docs/plan-schema.md) ---------------------------

PLAN_SCHEMA = "memoplan.plan/2"


PHASES = ("forward", "backward", "recompute")


@dataclass(frozen=True, kw_only=True)
class RuntimeSaved:
    """How the runtime treats one saved tensor (by the name of the node that makes it)."""

    name: str
    kind: str
    token_wise: bool
    seq_axis: int | None


@dataclass(frozen=True, kw_only=True)
class PhaseScript:
    """What the planned allocator places where while one layer runs one phase.

    ``slots``: (bytes, arena offset) of each request of the phase in order (offset -1: the
    pool serves it); ``region``: (offset, bytes) of the block where the requests no slot
    places go first-fit (the workspace for recomputing dropped tokens), or None; ``ring``
    (forward and backward under context parallelism; None otherwise, and in plans written
    before it): (offset, bytes) of the arena span level 1 gives ring attention's buffers
    (its ``ring:*`` blocks) inside the layer's ``fwd[i]``/``bwd[i]`` block, where the
    requests of the ring call go first-fit while it runs (``runtime.ring``).
    """

    slots: tuple[tuple[int, int], ...] = ()
    region: tuple[int, int] | None = None
    ring: tuple[int, int] | None = None

    def to_json(self) -> dict:
        out: dict = {"slots": [list(x) for x in self.slots],
                     "region": list(self.region) if self.region else None}
        if self.ring:  # only under context parallelism: other plans read as before
            out["ring"] = list(self.ring)
        return out

    @classmethod
    def from_json(cls, d: dict, phase: str) -> PhaseScript:
        """Checked: every slot and span is a pair of whole numbers."""
        def pair(x: Any, what: str) -> tuple[int, int]:
            if not isinstance(x, (list, tuple)) or len(x) != 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in x):
                raise ValueError(f"{what} must be 2 whole numbers, got {x!r}")
            return (x[0], x[1])

        return cls(slots=tuple(pair(x, f"a {phase} slot") for x in d["slots"]),
                   region=pair(d["region"], f"a {phase} region") if d["region"] else None,
                   ring=pair(d["ring"], f"a {phase} ring span") if d.get("ring") else None)


@dataclass(frozen=True, kw_only=True)
class RuntimeLayer:
    """The part of a plan the runtime reads, written by ``memoplan solve`` and checked once at
    load: the layer's graph (to check its own trace against, and for ``memoplan emit``), how
    each saved tensor is handled, the arena blocks its own buffers live in, and per (phase,
    layer) the planned allocator's script. The runtime places nothing the plan does not say."""

    saved: tuple[RuntimeSaved, ...]
    nodes: tuple[dict, ...]                 # the forward graph's nodes (docs/plan-schema.md)
    segments: tuple[dict, ...]
    trace_seq: int                          # the length the nodes' shapes were traced at
    # arena blocks of the runtime's own buffers: name -> (offset, bytes, bytes claimed later)
    arena: dict[str, tuple[int, int, int]]
    scripts: dict[str, tuple[PhaseScript, ...]]  # phase -> one script per layer

    def script(self, phase: str, index: int) -> PhaseScript:
        return self.scripts[phase][index]

    def to_json(self) -> dict:
        return {"saved": [asdict(t) for t in self.saved], "nodes": list(self.nodes),
                "segments": list(self.segments), "trace_seq": self.trace_seq,
                "arena": {k: list(v) for k, v in self.arena.items()},
                "scripts": {ph: [sc.to_json() for sc in scripts]
                            for ph, scripts in self.scripts.items()}}

    @classmethod
    def from_json(cls, d: dict, n_layers: int) -> RuntimeLayer:
        """Checked: every phase has one script per layer, every slot and block is a pair or
        triple of whole numbers, every node names its op and class."""
        def ints(x: Any, n: int, what: str) -> tuple[int, ...]:
            if not isinstance(x, (list, tuple)) or len(x) != n or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in x):
                raise ValueError(f"{what} must be {n} whole numbers, got {x!r}")
            return tuple(x)

        scripts = {}
        for ph in PHASES:
            per_layer = d["scripts"][ph]
            if len(per_layer) != n_layers:
                raise ValueError(f"scripts.{ph} has {len(per_layer)} entries for {n_layers} "
                                 f"layers")
            scripts[ph] = tuple(PhaseScript.from_json(sc, ph) for sc in per_layer)
        nodes = tuple(d["nodes"])
        for n in nodes:
            if not all(k in n for k in ("name", "target", "class", "axes")):
                raise ValueError(f"a graph node lacks name/target/class/axes: {n!r}")
        return cls(saved=tuple(RuntimeSaved(**t) for t in d["saved"]), nodes=nodes,
                   segments=tuple(d.get("segments", ())), trace_seq=int(d["trace_seq"]),
                   arena={k: ints(v, 3, f"arena block {k!r}") for k, v in d["arena"].items()},
                   scripts=scripts)


@dataclass(frozen=True, kw_only=True)
class LayerDecision:
    """What happens to one layer's saved tensors (bytes per GPU).

    ``mode``: ``offload`` (always-part plus alpha of the token-wise part copied to host, the rest
    recomputed), ``keep`` (everything stays on the GPU: the last layers), ``recompute``
    (checkpointed: only the input stays, the whole layer is recomputed; a host-memory fallback).
    """

    index: int
    mode: Literal["offload", "keep", "recompute"]
    alpha: float
    swapped_bytes: int
    recomputed_bytes: int
    host_bytes: int
    gpu_kept_bytes: int


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """Cost-model figures; ``iteration_s``/``mfu``/``gpu_bytes`` keyed by plan, keep_all,
    full_recompute."""

    forward_s: float              # one layer on one GPU
    backward_s: float
    token_wise_forward_s: float   # the token-wise share of forward_s (what recompute re-runs)
    pcie_bytes_per_s: float       # one GPU's share of its node's host link
    copy_s: float
    stall_s: float
    recompute_s: float
    iteration_s: dict[str, float]
    mfu: dict[str, float]
    gpu_bytes: dict[str, int]


@dataclass(frozen=True)
class Steps:
    """The phase steps of one iteration of ``layers`` layers: level 2's time axis, shared by the
    solver, the pictures and the tests (one place owns it)::

        0 embedding | 1..L forward of layer 0..L-1 | L+1 head and loss | then for layer L-1..0:
        its rebuild (the dropped tokens recomputed, or a checkpointed layer's forward re-run)
        and its backward graph

    A layer's rebuild workspace and its backward's transients are never live together.
    """

    layers: int

    def forward(self, i: int) -> int:
        return 1 + i

    @property
    def head(self) -> int:
        return self.layers + 1

    def rebuild(self, i: int) -> int:
        return self.layers + 2 + 2 * (self.layers - 1 - i)

    def backward(self, i: int) -> int:
        return self.rebuild(i) + 1

    @property
    def count(self) -> int:
        return 3 * self.layers + 2

    def labels(self) -> list[str]:
        """embed, F0..F(L-1), head, R(L-1), B(L-1), .., R0, B0."""
        n = self.layers
        return (["embed"] + [f"F{i}" for i in range(n)] + ["head"]
                + [x for i in reversed(range(n)) for x in (f"R{i}", f"B{i}")])


@dataclass(frozen=True, kw_only=True)
class LevelPlan:
    """One solved DSA level: offsets by request/block id, with how good they are."""

    offsets: dict[str, int]
    sizes: dict[str, int]
    lifetimes: dict[str, tuple[int, int]]   # [start, end) in request steps (level 2: phase steps)
    kinds: dict[str, str]                   # what each tensor/block is, for pictures
    peak: int
    lower_bound: int
    greedy_peak: int
    caching_reserved_peak: int
    caching_allocated_peak: int
    status: str
    gap: float
    seconds: float
    # growing blocks (solve.dsa.Block.grow): id -> (extra bytes right after `sizes`, from step)
    grows: dict[str, tuple[int, int]] = field(default_factory=dict)
    # growing blocks whose extra bytes come right before `sizes`' (solve.dsa.Block.grows_down)
    grows_down: tuple[str, ...] = ()
    # where the offsets come from ("greedy", "phase-ordered", "stacked", "chained", "search",
    # "mip"; "folded" in plans written before "chained") and what the solver ran and skipped,
    # and why (solve.dsa.Placement.note); "" in older plans
    method: str = ""
    note: str = ""

    @property
    def ratio(self) -> float:
        """Planned peak over the lower bound (1.0 = no fragmentation at all)."""
        return self.peak / self.lower_bound if self.lower_bound else 1.0


@dataclass(frozen=True, kw_only=True)
class Plan:
    profile_hash: str
    layer_class: str
    config: dict
    layers: tuple[LayerDecision, ...]
    arena_bytes: int
    lower_bound_bytes: int
    state_bytes: int
    levels: dict[str, LevelPlan]
    predicted: Prediction
    solver: dict
    layer: RuntimeLayer  # what the runtime reads (see RuntimeLayer)
    notes: tuple[str, ...] = ()
    schema: str = PLAN_SCHEMA
    pool_bytes: int = 0  # allocated outside the arena (embedding output, logits, loss), per GPU

    def to_json(self) -> dict:
        def level(lp: LevelPlan) -> dict:
            d = asdict(lp)
            d["lifetimes"] = {k: list(v) for k, v in lp.lifetimes.items()}
            d["grows"] = {k: list(v) for k, v in lp.grows.items()}
            d["ratio"] = lp.ratio
            return d

        return {
            "schema": self.schema,
            "profile_hash": self.profile_hash,
            "layer_class": self.layer_class,
            "config": self.config,
            "layers": [asdict(l) for l in self.layers],
            "arena_bytes": self.arena_bytes,
            "lower_bound_bytes": self.lower_bound_bytes,
            "state_bytes": self.state_bytes,
            "pool_bytes": self.pool_bytes,
            "levels": {k: level(v) for k, v in self.levels.items()},
            "predicted": asdict(self.predicted),
            "solver": self.solver,
            "layer": self.layer.to_json(),
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        try:
            levels = {}
            for k, v in d["levels"].items():
                v = {kk: vv for kk, vv in v.items() if kk != "ratio"}
                v["lifetimes"] = {kk: tuple(vv) for kk, vv in v["lifetimes"].items()}
                v["grows"] = {kk: tuple(vv) for kk, vv in v.get("grows", {}).items()}
                v["grows_down"] = tuple(v.get("grows_down", ()))
                levels[k] = LevelPlan(**v)
            return cls(schema=d["schema"], profile_hash=d["profile_hash"],
                       layer_class=d["layer_class"], config=d["config"],
                       layers=tuple(LayerDecision(**l) for l in d["layers"]),
                       arena_bytes=int(d["arena_bytes"]), lower_bound_bytes=int(d["lower_bound_bytes"]),
                       state_bytes=int(d["state_bytes"]), levels=levels,
                       pool_bytes=int(d.get("pool_bytes", 0)),
                       predicted=Prediction(**d["predicted"]), solver=d["solver"],
                       layer=RuntimeLayer.from_json(d["layer"], len(d["layers"])),
                       notes=tuple(d.get("notes", ())))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MemoplanError(
                f"The plan file is incomplete or malformed ({type(e).__name__}: {e}). "
                f"Run 'memoplan solve' again to write a fresh one."
            ) from e
