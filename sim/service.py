"""The simulator service: validate, plan and admit generations, with faults applied."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sim.config import SimConfig
from sim.engine import Engine, Job, Sequence, Stats
from sim.errors import SimError, incomplete, invalid, overloaded
from sim.faults import FAULT_HEADER, STALL_HEADER, Fault, Faults
from sim.model import Plan, Token, plan_generation
from sim.schemas import FaultMode, GenerateParameters
from sim.validation import ValidRequest, validate

# Mid-stream faults strike after this many tokens (fewer if the output is shorter).
FAULT_AFTER_TOKENS = 3
_MID_STREAM = (FaultMode.GENERATION, FaultMode.DISCONNECT)
# Faults that shorten the output, and those of them that also end the stream without its
# final event (the routes apply those).
_TRUNCATING = (FaultMode.CUT, FaultMode.ABORT, FaultMode.GARBAGE)
_ENDINGS = (FaultMode.CUT, FaultMode.GARBAGE)


@dataclass(frozen=True, slots=True)
class Generation:
    """An admitted generation: the validated request and its running sequence."""

    request: ValidRequest
    seq: Sequence
    ending: FaultMode | None = None  # `cut` or `garbage`: how the stream ends instead

    @property
    def plan(self) -> Plan:
        """The tokens this generation will produce."""
        return self.seq.job.plan

    async def collect(self) -> list[Token]:
        """Wait for every token."""
        return [token async for token in self.seq if token is not None]

    @property
    def reported_seed(self) -> int | None:
        """The seed TGI reports: only when sampling."""
        return self.request.seed if self.request.sampling else None


class Simulator:
    """One simulated TGI server: settings, the batching engine and the fault plan."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine = Engine(config)
        self.faults = Faults(config.error_rate, config.seed)

    @property
    def stats(self) -> Stats:
        """Request counters."""
        return self.engine.stats

    def accept(self, headers: Mapping[str, str]) -> Fault | None:
        """Count a generation request and pick its fault; raise if it fails outright."""
        self.stats.total_requests += 1
        fault = self.faults.take(headers.get(FAULT_HEADER), headers.get(STALL_HEADER))
        if fault is not None and fault.mode is FaultMode.HTTP500:
            self.stats.failures["incomplete"] += 1
            raise incomplete()
        return fault

    def start(
        self,
        prompt: str,
        params: GenerateParameters,
        fault: Fault | None,
        *,
        stream: bool,
        keepalive_s: float | None = None,
    ) -> Generation:
        """Validate, plan and admit one generation; raise `SimError` as TGI would."""
        request = self._validate(prompt, params, fault, stream=stream)
        if fault is not None and fault.mode is FaultMode.OVERLOADED:
            self.stats.failures["overloaded"] += 1
            raise overloaded()
        seq = self.engine.submit(self._job(request, fault, keepalive_s))
        self.stats.last_prompt, self.stats.last_input_length = request.prompt, request.input_length
        ending = fault.mode if fault is not None and fault.mode in _ENDINGS else None
        return Generation(request, seq, ending)

    def finish(self, generation: Generation) -> None:
        """Free the generation's slot (cancelling it if still running)."""
        self.engine.release(generation.seq)

    def _validate(
        self, prompt: str, params: GenerateParameters, fault: Fault | None, *, stream: bool
    ) -> ValidRequest:
        try:
            if fault is not None and fault.mode is FaultMode.VALIDATION:
                raise invalid("simulated validation failure")
            return validate(prompt, params, self.config, stream=stream)
        except SimError:
            self.stats.failures["validation"] += 1
            raise

    def _job(self, request: ValidRequest, fault: Fault | None, keepalive_s: float | None) -> Job:
        config = self.config
        plan = plan_generation(
            request.prompt,
            request.seed,
            request.max_new_tokens,
            request.stop,
            config.fixed_output_tokens,
            config.reply,
        )
        if fault is not None:
            plan = _faulted_plan(plan, fault.mode)
        stall_ms = config.stall_ms
        if fault is not None and fault.mode is FaultMode.STALL:
            stall_ms += fault.stall_ms
        prefill_ms = config.ttft_ms + config.prefill_ms_per_token * request.input_length + stall_ms
        mid_stream = fault.mode if fault is not None and fault.mode in _MID_STREAM else None
        return Job(
            plan=plan,
            input_length=request.input_length,
            prefill_s=prefill_ms / 1000,
            fault=mid_stream,
            fault_at=min(FAULT_AFTER_TOKENS, len(plan.tokens) - 1),
            keepalive_s=keepalive_s,
        )


def _faulted_plan(plan: Plan, mode: FaultMode) -> Plan:
    """The output as a fault changes it: cut short (finish `abort` for that fault), or a NUL."""
    if mode in _TRUNCATING:
        kept = plan.tokens[: max(1, min(FAULT_AFTER_TOKENS, len(plan.tokens) - 1))]
        return Plan(kept, "abort" if mode is FaultMode.ABORT else plan.finish_reason)
    if mode is FaultMode.NUL:
        first = plan.tokens[0]
        nul = Token(first.id, first.text + "\x00", first.logprob, first.special)
        return Plan((nul, *plan.tokens[1:]), plan.finish_reason)
    return plan
