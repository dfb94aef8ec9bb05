"""The benchmark loop: every set, dtype and case, with the providers interleaved call by call.

For each (set, dtype) the grads are created once (a pristine copy and rotating working copies),
the fp64 norm is computed, and every provider is bound once (torch.compile compiles on its first
call, once for both cases; that time is recorded apart and budgeted). Then for each case (clipped,
unclipped) every provider is warmed up, profiled once for its launch count, and timed: rounds of
one call per provider, the order rotated every round, each call on the next working copy, the copy
restored after a clipped call. Medians over the rounds go into the rows.

Sets run from the fewest tensors to the most, so that the torch.compile budget (compile time
grows with the number of tensors) covers as many sets as it can; rows come back in report order.

With a time budget (the default run) the seconds left are shared among the cases left: each case
gets its slice, its rounds stop once the slice is spent (after ``min_reps`` rounds), and a set not
started when the budget is gone is reported as skipped. A busy machine therefore gets fewer rounds,
not a longer run.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from .environment import DeviceInfo
from .gradsets import CLIPPED_SCALE, MAX_NORM, GradSet, copies_needed
from .measure import Sample, count_launches, reference_norm, time_call, timing_seconds
from .metrics import bandwidth_gbps, bytes_moved, median, relative_error, share, speedup
from .progress import NoProgress, Progress
from .providers import BASELINE, Clip, Provider
from .results import STATUS_FAILED, STATUS_SKIPPED, Row
from .suites import DTYPES, SUITES, DtypeSpec, Suite, Variant

#: (case, factor applied to the base grads); max_norm is MAX_NORM in both
CASES = (("clipped", CLIPPED_SCALE), ("unclipped", 1.0))
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
    launches_every_case: bool = True  # False: count on the clipped call, reuse for the unclipped one
    count_launches: bool = True  # False: no profiled call at all (the launches column stays empty)
    time_budget_s: float | None = None  # seconds for the whole loop; None: no limit
    seed: int = 0


@dataclass
class Run:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compile_spent_s: float = 0.0


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class _Bound:
    """The providers bound for one (set, dtype), shared by its cases."""

    calls: dict[str, Clip] = field(default_factory=dict)
    unusable: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (status, reason)
    compile_s: dict[str, float] = field(default_factory=dict)


class Runner:
    def __init__(self, options: Options, info: DeviceInfo, copy_gbps: float, progress: Progress | None = None):
        self.options = options
        self.info = info
        self.device = info.device
        self.copy_gbps = copy_gbps
        self.progress = progress or NoProgress()
        self.run_state = Run()
        self.launch_counts: dict[tuple[str, str, str], int] = {}  # (set, dtype, provider) -> launches
        self.memory_budget = int(info.memory_bytes * MEMORY_SHARE)
        self._started = time.perf_counter()
        self._cases_left = 0
        self._cases_measured = 0

    # -- the time budget ----------------------------------------------------------------------------
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._started

    def budget_spent(self) -> bool:
        """True once the time budget is spent; never before the first set has been measured in both
        cases, so that even a very slow machine reports something."""
        budget = self.options.time_budget_s
        return budget is not None and self._cases_measured >= len(CASES) and self.elapsed_s() >= budget

    def case_target_s(self) -> float:
        """Seconds of timed rounds for the next case: ``target_s``, or less when the time budget's
        remainder, shared among the cases left (with room for set-up), is smaller."""
        target = self.options.target_s
        budget = self.options.time_budget_s
        if budget is None:
            return target
        left = max(0.0, budget - self.elapsed_s())
        return max(0.02, min(target, 0.6 * left / max(1, self._cases_left)))

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Run:
        budget = self._budget()
        cells = [(SUITES[s], DTYPES[d]) for s in self.options.suites for d in self.options.dtypes]
        if any(p.compiles for p in self.options.providers):
            # the compile budget covers as many sets as it can when they run from the fewest tensors
            order = sorted(cells, key=lambda cell: cell[0].fit(budget, cell[1]).tensors)
        else:  # every set in the first dtype, then the next: a spent time budget still leaves every set
            order = sorted(cells, key=lambda cell: self.options.dtypes.index(cell[1].name))
        self.progress.start(len(cells) * len(CASES))
        self._started = time.perf_counter()
        self._cases_left = len(cells) * len(CASES)
        try:
            for suite, spec in order:
                if self.budget_spent():
                    self._skip_for_time(suite, spec, budget)
                    continue
                self._measure_set(suite, spec, budget)
        finally:
            self.progress.stop()
        self.run_state.rows.sort(key=self._report_order)
        return self.run_state

    def _report_order(self, row: Row) -> tuple[int, int, int, int]:
        providers = [p.name for p in self.options.providers]
        return (
            self.options.suites.index(row.set),
            self.options.dtypes.index(row.dtype),
            [case for case, _ in CASES].index(row.case),
            providers.index(row.provider),
        )

    def _budget(self) -> int:
        budget = self.options.budget_bytes
        memory_cap = self.memory_budget // 2  # pristine + at least one working copy must fit
        return memory_cap if budget is None else min(budget, memory_cap)

    def _time_skipped_rows(self, suite: Suite, variant: Variant, spec: DtypeSpec, case: str) -> list[Row]:
        reason = "the run's time budget was spent (--time-budget; --full has none)"
        return [
            Row(
                set=suite.name,
                scale=variant.scale,
                tensors=variant.tensors,
                elements=variant.elements,
                dtype=spec.name,
                case=case,
                provider=provider.name,
                status=STATUS_SKIPPED,
                reason=reason,
                grad_bytes=spec.nbytes(variant),
            )
            for provider in self.options.providers
        ]

    def _skip_for_time(self, suite: Suite, spec: DtypeSpec, budget: int) -> None:
        """A set left out because the time budget is spent: rows marked skipped, with the reason."""
        variant = suite.fit(budget, spec)
        if spec.dtypes_for(variant.shapes) is not None:
            for case, _ in CASES:
                self.run_state.rows.extend(self._time_skipped_rows(suite, variant, spec, case))
        self._skip_cases(f"{suite.name} {spec.name}")

    def _measure_set(self, suite: Suite, spec: DtypeSpec, budget: int) -> None:
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
        reference = reference_norm(gradset.pristine)  # exact for every case: the scales are powers of two
        bound = self._bind(variant)
        try:
            for case, scale in CASES:
                if self.budget_spent():
                    self.run_state.rows.extend(self._time_skipped_rows(suite, variant, spec, case))
                    self._cases_left -= 1
                    self.progress.advance()
                    continue
                self.progress.step(f"{label} {case}")
                gradset.set_scale(scale)
                cell = _Cell(self, suite, variant, spec, gradset, reference * scale, case, grad_bytes, bound)
                self.run_state.rows.extend(cell.measure())
                self._cases_measured += 1
                self._cases_left -= 1
                self.progress.advance()
        finally:
            del gradset, bound
            if any(p.compiles for p in self.options.providers):
                torch._dynamo.reset()  # drop this set's graphs before the next set's grads
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _bind(self, variant: Variant) -> _Bound:
        bound = _Bound()
        for provider in self.options.providers:
            reason = self.compile_skip_reason(variant) if provider.compiles else None
            if reason is not None:
                bound.unusable[provider.name] = (STATUS_SKIPPED, reason)
                continue
            try:
                bound.calls[provider.name] = provider.bind(MAX_NORM)
            except Exception as error:
                bound.unusable[provider.name] = (STATUS_FAILED, _short(error))
        return bound

    def _skip_cases(self, label: str) -> None:
        for case, _ in CASES:
            self.progress.step(f"{label} {case}")
            self._cases_left -= 1
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
        grad_bytes: int,
        bound: _Bound,
    ) -> None:
        self.runner = runner
        self.device = runner.device
        self.gradset = gradset
        self.reference = reference
        self.clipped = case == "clipped"
        self.bound = bound
        self._copies = itertools.cycle(range(gradset.copies))
        self.rows: dict[str, Row] = {}
        for provider in runner.options.providers:
            row = Row(
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
            if provider.name in bound.unusable:
                row.status, row.reason = bound.unusable[provider.name]
            self.rows[provider.name] = row
        self.providers = [p for p in runner.options.providers if p.name in bound.calls]
        self.warm_s: dict[str, float] = {}
        self.samples: dict[str, list[Sample]] = {}
        self.target_s = runner.options.target_s

    def measure(self) -> list[Row]:
        self.target_s = self.runner.case_target_s()
        for provider in self.providers:
            self._warm_up(provider)
        if self.runner.options.count_launches:
            for name in self._live():
                self._count_launches(name)
        self._timed_rounds()
        self._fill_rows()
        return list(self.rows.values())

    def _live(self) -> list[str]:
        return [p.name for p in self.providers if p.name in self.bound.calls]

    # -- one call on the next working copy ------------------------------------------------------
    def _call(self, name: str) -> tuple[Sample, object]:
        copy = next(self._copies)
        params = self.gradset.params[copy]
        fn = self.bound.calls[name]
        try:
            return time_call(lambda: fn(params), self.device)
        finally:
            if self.clipped:
                self.gradset.restore(copy)

    def _fail(self, name: str, error: BaseException) -> None:
        """A provider that cannot take this set is a row, not a crash (nor tried again on it)."""
        reason = _short(error)
        self.rows[name].status, self.rows[name].reason = STATUS_FAILED, reason
        self.bound.calls.pop(name, None)
        self.bound.unusable[name] = (STATUS_FAILED, reason)
        self.samples.pop(name, None)
        if isinstance(error, torch.OutOfMemoryError) and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _warm_up(self, provider: Provider) -> None:
        row = self.rows[provider.name]
        try:
            sample, norm = self._call(provider.name)
            if provider.compiles and provider.name not in self.bound.compile_s:
                # that first call compiled: record it apart, and warm up once more
                self.bound.compile_s[provider.name] = sample.wall_s
                self.runner.run_state.compile_spent_s += sample.wall_s
                sample, norm = self._call(provider.name)
            row.norm_rel_err = relative_error(float(norm), self.reference)  # type: ignore[arg-type]
            self.warm_s[provider.name] = sample.wall_s
        except Exception as error:
            self._fail(provider.name, error)
        row.compile_s = self.bound.compile_s.get(provider.name)

    def _count_launches(self, name: str) -> None:
        row = self.rows[name]
        key = (row.set, row.dtype, name)
        if not self.runner.options.launches_every_case and key in self.runner.launch_counts:
            row.launches = self.runner.launch_counts[key]
            return
        copy = next(self._copies)
        params = self.gradset.params[copy]
        fn = self.bound.calls[name]
        try:
            # A first call on this copy first: a provider that caches per set of grads (fusedclip's
            # plans) does its one-time work there, and the profiled call is a steady-state one.
            fn(params)
            if self.clipped:
                self.gradset.restore(copy)
            row.launches = self.runner.launch_counts[key] = count_launches(lambda: fn(params), self.device)
        except Exception as error:
            self._fail(name, error)
        finally:
            if self.clipped:
                self.gradset.restore(copy)

    def _rounds(self) -> int:
        options = self.runner.options
        if options.reps is not None:
            return options.reps
        per_round = sum(self.warm_s[name] for name in self._live())
        if self.clipped:
            per_round *= 1.5  # the restores
        if per_round <= 0:
            return options.max_reps
        return max(options.min_reps, min(options.max_reps, math.ceil(self.target_s / per_round)))

    def _timed_rounds(self) -> None:
        names = self._live()
        if not names:
            return
        rounds = self._rounds()
        self.samples = {name: [] for name in names}
        options = self.runner.options
        # A slower machine than the warm-up suggested (other work started) ends the rounds early.
        deadline = time.perf_counter() + 2 * self.target_s
        for index in range(rounds):
            names = self._live()
            if not names:
                break
            if options.reps is None and index >= options.min_reps and time.perf_counter() > deadline:
                break
            shift = index % len(names)  # rotate the order so that no provider always runs first
            for name in names[shift:] + names[:shift]:
                try:
                    sample, _ = self._call(name)
                except Exception as error:
                    self._fail(name, error)
                    continue
                self.samples[name].append(sample)

    def _fill_rows(self) -> None:
        baseline = self.samples.get(BASELINE)
        baseline_wall = median([s.wall_s for s in baseline]) if baseline else None
        for name, samples in self.samples.items():
            if not samples:
                continue
            row = self.rows[name]
            row.reps = len(samples)
            wall = median([s.wall_s for s in samples])
            device_s = median([s.device_s for s in samples])
            cpu_s = median([s.cpu_s for s in samples])
            row.wall_ms = None if wall is None else wall * 1e3
            row.device_ms = None if device_s is None else device_s * 1e3
            row.cpu_ms = None if cpu_s is None else cpu_s * 1e3
            row.gbps = bandwidth_gbps(row.bytes_moved, timing_seconds(samples, self.device))
            row.copy_share = share(row.gbps, self.runner.copy_gbps)
            row.speedup = speedup(baseline_wall, wall)
