"""The solver's answer: stages, exits with thresholds, and everything it predicts about them."""

from __future__ import annotations

from dataclasses import dataclass, field

from distree.serde import JsonRecord


WITHIN_GAP = "within-gap"           # a plan's status when the solver stopped at the --gap asked for
INTERRUPTED = "interrupted"         # ... when Ctrl-C ended its search before a proof (distree.interrupt)


@dataclass(frozen=True)
class ExitChoice(JsonRecord):
    name: str                       # graph output name of the head
    after_block: int
    threshold: float                # leave iff score >= threshold
    exit_rate: float                # share of all calibration samples that leave here


@dataclass(frozen=True)
class Stage(JsonRecord):
    device: str
    first_block: int                # inclusive
    last_block: int                 # inclusive
    exits: tuple[ExitChoice, ...]
    compute_ms: float               # expected compute on this stage per request (blocks + heads, weighted by reach)
    transfer_in_ms: float           # expected time to receive its input (weighted by reach)
    memory_bytes: int
    reach_rate: float               # share of requests that reach this stage


@dataclass(frozen=True)
class Plan(JsonRecord):
    model_sha256: str
    score_kind: str
    source: str                     # device where requests arrive and answers return
    stages: tuple[Stage, ...]
    expected_latency_ms: float
    worst_case_latency_ms: float    # no exit taken
    no_exit_latency_ms: float       # best plan without exits, for comparison
    accuracy: float                 # on the calibration (threshold) split
    accuracy_lcb: float             # one-sided lower confidence bound at ``confidence``
    full_model_accuracy: float
    confidence: float
    accuracy_drop: float
    memory_bytes: dict[str, int]
    breakdown_ms: dict[str, float]  # compute / heads / transfers / return
    solver: str                     # what produced it: "highs" / "cbc" (the MILP ran) or "branch-and-bound"
    status: str                     # "optimal", WITHIN_GAP (proven within --gap), or "time-limit" / "feasible"
    #                                 / INTERRUPTED with a gap
    gap: float
    wall_s: float
    sol_status: str = ""            # the MILP solver's own solution status (PuLP's name)
    bound_ms: float = 0.0           # proven lower bound on the expected latency of any feasible plan
    final_rate: float = 0.0         # share of samples answered by the final classifier
    required_correct: int = 0       # calibration samples the plan had to answer right (the accuracy promise)
    n_samples: int = 0              # calibration samples behind every rate above
    model_stats: dict[str, float] = field(default_factory=dict)   # MILP size and solve time; with a start
    #                                 plan (--start, a sweep's previous point): start_ms, start_feasible
    busy_ms: dict[str, float] = field(default_factory=dict)   # per device in use: expected time it is busy per
    #                                 request (compute, heads, and its request handling if handling_measured)
    handling_measured: bool = False   # the profile had serve:receive / serve:forward for every device
    traffic: str = ""               # what hops were charged for (Constraints.traffic); "" for old plans
    idle_hops_measured: bool = False  # the profile had rpc:idle entries for every device (else hops back to back)

    def capacity(self) -> tuple[str, float] | None:
        """(busiest device, the requests/s it sustains), what pipelining allows at most; None for old plans."""
        if not self.busy_ms:
            return None
        device = max(self.busy_ms, key=self.busy_ms.get)
        busy = self.busy_ms[device]
        return device, (1000.0 / busy if busy > 0 else float("inf"))

    def capacity_line(self) -> str:
        """"capacity ~N req/s (busiest ...)", or "" for a plan made before busy times were recorded."""
        found = self.capacity()
        if found is None:
            return ""
        device, rps = found
        what = ("compute, heads and request handling" if self.handling_measured else
                "compute and heads only: the profile predates request handling, so this is an upper bound")
        return (f"capacity ~{rps:,.0f} req/s (busiest: {device}, {self.busy_ms[device]:.3f} ms a request: "
                f"{what})")

    def no_exit_text(self) -> str:
        """The best plan without exits, or that none meets the constraints (a rate or deadline only exits reach)."""
        return ("none meets the constraints" if self.no_exit_latency_ms != self.no_exit_latency_ms
                else f"{self.no_exit_latency_ms:.3f} ms")

    def hops_line(self) -> str:
        """How its hops were charged, for a plan with any ("" otherwise, and for plans made before it was said)."""
        if not self.traffic or all(s.device == self.source for s in self.stages):
            return ""
        if not self.idle_hops_measured:
            return ("hops charged back to back: the profile predates rpc:idle, and a lone request pays more per hop; "
                    "profile again")
        return ("hops charged for sporadic requests (each after the pipeline idled; --traffic steady: back to back)"
                if self.traffic == "sporadic" else
                "hops charged for requests back to back (--traffic steady; a lone request pays more per hop)")
