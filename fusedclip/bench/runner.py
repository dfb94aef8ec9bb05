"""The benchmark loop: every set, dtype and case, with the providers interleaved call by call.

For each (set, dtype) the grads are created once (a pristine copy and rotating working copies),
and the fp64 norm is computed. Then for each case (clipped, unclipped) every provider is bound,
warmed up (the first call of torch.compile compiles; that time is recorded apart and budgeted),
profiled once for its launch count, and timed: rounds of one call per provider, the order rotated
every round, each call on the next working copy, the copy restored after a clipped call. Medians
over the rounds go into the rows.
"""

from __future__ import annotations

import gc
import itertools
import math
from dataclasses import dataclass, field

import torch

from .environment import DeviceInfo
from .gradsets import GradSet, copies_needed
from .measure import Sample, count_launches, reference_norm, time_call, timing_seconds
from .metrics import bandwidth_gbps, bytes_moved, median, relative_error, share, speedup
from .progress import NoProgress, Progress
from .providers import BASELINE, Clip, Provider
from .results import STATUS_FAILED, STATUS_SKIPPED, Row
from .suites import DTYPES, SUITES, DtypeSpec, Suite, Variant

#: max_norm of the clipped case: the grads' norm is about 100, so every call clips (coef ~0.01)
CLIPPED_MAX_NORM = 1.0
#: max_norm of the unclipped case: far above the norm, so the coefficient is 1
UNCLIPPED_MAX_NORM = 1e6
CASES = (("clipped", CLIPPED_MAX_NORM), ("unclipped", UNCLIPPED_MAX_NORM))
#: share of the free memory one set's grads may use (pristine + working copies + temporaries)
MEMORY_SHARE = 0.45


@dataclass
class Options:
    suites: list[str]
    dtypes: list[str]
    providers: list[Provider]
    budget_bytes: int | None  # largest set (bytes of grads) before scaling down; None: no limit
    reps: int | None = None  # fixed rounds; None: enough for target_s per cell, within min/max
    min_reps: int = 5
    max_reps: int = 100
    target_s: float = 1.0  # timed seconds aimed at per (set, dtype, case)
    compile_budget_s: float = 0.0
    compile_max_tensors: int = 300
    seed: int = 0


@dataclass
class Run:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compile_spent_s: float = 0.0


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class Runner:
    def __init__(self, options: Options, info: DeviceInfo, copy_gbps: float, progress: Progress | None = None):
        self.options = options
        self.info = info
        self.device = info.device
        self.copy_gbps = copy_gbps
        self.progress = progress or NoProgress()
        self.run_state = Run()
        self.memory_budget = int(info.memory_bytes * MEMORY_SHARE)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Run:
        cells = [(SUITES[s], DTYPES[d]) for s in self.options.suites for d in self.options.dtypes]
        self.progress.start(len(cells) * len(CASES))
        try:
            for suite, spec in cells:
                self._measure_set(suite, spec)
        finally:
            self.progress.stop()
        return self.run_state

    def _budget(self) -> int:
        budget = self.options.budget_bytes
        # pristine + at least one working copy must fit
        memory_cap = self.memory_budget // 2
        return memory_cap if budget is None else min(budget, memory_cap)

    def _measure_set(self, suite: Suite, spec: DtypeSpec) -> None:
        budget = self._budget()
        variant = suite.fit(budget, spec)
        dtypes = spec.dtypes_for(variant.shapes)
        label = f"{suite.name} {spec.name}"
        if dtypes is None:
            self.run_state.notes.append(f"{suite.name} / {spec.name}: not measured (a single tensor cannot mix dtypes)")
            self._skip_cases(label)
            return
        grad_bytes = spec.nbytes(variant)
        if 2 * grad_bytes > self.memory_budget:
            self.run_state.notes.append(
                f"{suite.name} / {spec.name}: not measured ({variant.scale} needs {grad_bytes / 2**30:.1f} GiB"
                f" twice; {self.memory_budget / 2**30:.1f} GiB may be used)"
            )
            self._skip_cases(label)
            return
        copies = copies_needed(grad_bytes, self.info.cache_bytes, self.memory_budget)
        self.progress.step(f"{label}: creating grads")
        gradset = GradSet(variant.shapes, dtypes, self.device, copies, seed=self.options.seed)
        reference = reference_norm(gradset.pristine)
        try:
            for case, max_norm in CASES:
                self.progress.step(f"{label} {case}")
                rows = _Cell(self, suite, variant, spec, gradset, reference, case, max_norm, grad_bytes).measure()
                self.run_state.rows.extend(rows)
                self.progress.advance()
        finally:
            del gradset
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _skip_cases(self, label: str) -> None:
        for case, _ in CASES:
            self.progress.step(f"{label} {case}")
            self.progress.advance()

    # -- torch.compile budget ---------------------------------------------------------------------
    def compile_skip_reason(self, variant: Variant) -> str | None:
        options = self.options
        if variant.tensors > options.compile_max_tensors:
            return (
                f"{variant.tensors} tensors > --compile-max-tensors {options.compile_max_tensors}"
                " (inductor's compile time grows faster than the number of tensors)"
            )
        if self.run_state.compile_spent_s >= options.compile_budget_s:
            return f"the torch.compile budget of {options.compile_budget_s:.0f} s is spent (--compile-budget)"
        return None


class _Cell:
    """One (set, dtype, case): every provider warmed up, profiled and timed, interleaved."""

    def __init__(
        self,
        runner: Runner,
        suite: Suite,
        variant: Variant,
        spec: DtypeSpec,
        gradset: GradSet,
        reference: float,
        case: str,
        max_norm: float,
        grad_bytes: int,
    ) -> None:
        self.runner = runner
        self.device = runner.device
        self.variant = variant
        self.gradset = gradset
        self.reference = reference
        self.clipped = case == "clipped"
        self.max_norm = max_norm
        self._copies = itertools.cycle(range(gradset.copies))
        self.rows: dict[str, Row] = {}
        for provider in runner.options.providers:
            self.rows[provider.name] = Row(
                set=suite.name,
                scale=variant.scale,
                tensors=variant.tensors,
                elements=variant.elements,
                dtype=spec.name,
                case=case,
                provider=provider.name,
                grad_bytes=grad_bytes,
                bytes_moved=bytes_moved(grad_bytes, self.clipped),
                copies=gradset.copies,
            )
        self.calls: dict[str, Clip] = {}
        self.warm_s: dict[str, float] = {}
        self.samples: dict[str, list[Sample]] = {}

    def measure(self) -> list[Row]:
        for provider in self.runner.options.providers:
            self._warm_up(provider)
        for name in list(self.calls):
            self._count_launches(name)
        self._timed_rounds()
        self._fill_rows()
        return list(self.rows.values())

    # -- one call on the next working copy ------------------------------------------------------
    def _call(self, name: str) -> tuple[Sample, object]:
        copy = next(self._copies)
        params = self.gradset.params[copy]
        fn = self.calls[name]
        try:
            return time_call(lambda: fn(params), self.device)
        finally:
            if self.clipped:
                self.gradset.restore(copy)

    def _fail(self, name: str, error: BaseException) -> None:
        row = self.rows[name]
        row.status, row.reason = STATUS_FAILED, _short(error)
        self.calls.pop(name, None)
        self.samples.pop(name, None)
        if name == "torch-compile":
            torch._dynamo.reset()
        if isinstance(error, torch.OutOfMemoryError) and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _warm_up(self, provider: Provider) -> None:
        row = self.rows[provider.name]
        if provider.compiles:
            reason = self.runner.compile_skip_reason(self.variant)
            if reason is not None:
                row.status, row.reason = STATUS_SKIPPED, reason
                return
        try:
            self.calls[provider.name] = provider.bind(self.max_norm)
            sample, norm = self._call(provider.name)  # compiles, for torch.compile
            if provider.compiles:
                row.compile_s = sample.wall_s
                self.runner.run_state.compile_spent_s += sample.wall_s
                sample, norm = self._call(provider.name)
            row.norm_rel_err = relative_error(float(norm), self.reference)  # type: ignore[arg-type]
            self.warm_s[provider.name] = sample.wall_s
        except Exception as error:  # a provider that cannot take this set is a row, not a crash
            if provider.compiles:
                row.compile_s = None
            self._fail(provider.name, error)

    def _count_launches(self, name: str) -> None:
        copy = next(self._copies)
        params = self.gradset.params[copy]
        fn = self.calls[name]
        try:
            self.rows[name].launches = count_launches(lambda: fn(params), self.device)
        except Exception as error:
            self._fail(name, error)
        finally:
            if self.clipped:
                self.gradset.restore(copy)

    def _rounds(self) -> int:
        options = self.runner.options
        if options.reps is not None:
            return options.reps
        per_round = sum(self.warm_s[name] for name in self.calls)
        if self.clipped:
            per_round *= 1.5  # the restores
        if per_round <= 0:
            return options.max_reps
        return max(options.min_reps, min(options.max_reps, math.ceil(options.target_s / per_round)))

    def _timed_rounds(self) -> None:
        if not self.calls:
            return
        rounds = self._rounds()
        self.samples = {name: [] for name in self.calls}
        for index in range(rounds):
            names = list(self.calls)
            shift = index % len(names)  # rotate the order so no provider always runs first
            for name in names[shift:] + names[:shift]:
                try:
                    sample, _ = self._call(name)
                except Exception as error:
                    self._fail(name, error)
                    continue
                self.samples[name].append(sample)
        for name, row in self.rows.items():
            if name in self.samples:
                row.reps = len(self.samples[name])

    def _fill_rows(self) -> None:
        device = self.device
        baseline = self.samples.get(BASELINE)
        baseline_wall = median([s.wall_s for s in baseline]) if baseline else None
        for name, samples in self.samples.items():
            if not samples:
                continue
            row = self.rows[name]
            wall = median([s.wall_s for s in samples])
            device_s = median([s.device_s for s in samples])
            row.wall_ms = None if wall is None else wall * 1e3
            row.device_ms = None if device_s is None else device_s * 1e3
            cpu = median([s.cpu_s for s in samples])
            row.cpu_ms = None if cpu is None else cpu * 1e3
            row.gbps = bandwidth_gbps(row.bytes_moved, timing_seconds(samples, device))
            row.copy_share = share(row.gbps, self.runner.copy_gbps)
            row.speedup = speedup(baseline_wall, wall)

