"""Every ```python block of README.md runs, as a reader would paste it.

Blocks run one by one, each in a fresh namespace, so each must stand on its own (define its model,
its optimizer, ...); any exception fails the test. A block that cannot run in one plain process is
marked by an HTML comment on the line before its opening fence (README readers do not see it):

* ``<!-- readme-test: torchrun -->``: runs under ``torchrun --standalone --nproc-per-node 2`` (gloo
  on the loopback interface); every rank must exit cleanly.
* ``<!-- readme-test: needs-cuda -->``: runs only where torch sees a CUDA device (skipped elsewhere).

Any other marker is an error, so a typo cannot silently skip a block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARKERS = ("torchrun", "needs-cuda")
_MARKER = re.compile(r"<!--\s*readme-test:\s*(\S+)\s*-->")
#: a marker alone on its line (a marker quoted in the text, in backticks, is not one)
_MARKER_LINE = re.compile(r"^\s*<!--\s*readme-test:\s*(\S+)\s*-->\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    line: int  # first line of code, 1-based
    heading: str
    code: str
    marker: str | None

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"line{self.line}-{slug}"


def python_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    heading = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            end = index + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise AssertionError(f"README.md line {index + 1}: a ```python block is never closed")
            before = index - 1
            while before >= 0 and not lines[before].strip():
                before -= 1
            found = _MARKER.fullmatch(lines[before].strip()) if before >= 0 else None
            code = "\n".join(lines[index + 1 : end]) + "\n"
            blocks.append(Block(index + 2, heading, code, found.group(1) if found else None))
            index = end
        index += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_runnable_examples_and_only_known_markers():
    assert len(BLOCKS) >= 6
    for block in BLOCKS:
        assert block.marker in (None, *MARKERS), f"README.md line {block.line}: unknown marker {block.marker!r}"
    # a marker comment must sit right before a python block, where this test reads it
    text = README.read_text(encoding="utf-8")
    assert len(_MARKER_LINE.findall(text)) == sum(block.marker is not None for block in BLOCKS)


def test_a_block_that_raises_fails():
    """The runner below really fails on an exception (and on a block that is not Python)."""
    with pytest.raises(ZeroDivisionError):
        _run_here(Block(1, "t", "x = 1 / 0\n", None))
    with pytest.raises(SyntaxError):
        _run_here(Block(1, "t", "pip install fusedclip\n", None))


def _run_here(block: Block) -> None:
    code = compile(block.code, f"README.md:{block.line}", "exec")
    exec(code, {"__name__": "__readme__"})  # noqa: S102 - the README's own examples


def _run_torchrun(block: Block, tmp_path: Path) -> str:
    script = tmp_path / f"readme_line{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"README.md line {block.line} under torchrun:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.marker == "needs-cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if block.marker != "torchrun":
        monkeypatch.chdir(tmp_path)  # files a block writes land in a scratch folder
        _run_here(block)
        return
    out = _run_torchrun(block, tmp_path)
    norms = re.findall(r"rank (\d+): global gradient norm ([0-9.]+)", out)
    if norms:  # the distributed example: every rank got the same global norm
        assert sorted(rank for rank, _ in norms) == ["0", "1"] and len({n for _, n in norms}) == 1, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the README shows the output of a machine without a GPU")
def test_the_available_backends_output_shown_is_what_a_cpu_only_machine_prints():
    """Run without TRITON_INTERPRET (which the test suite sets): what a user's plain process prints."""
    code = textwrap.dedent(
        """
        import fusedclip
        found = fusedclip.available_backends("cpu")
        assert found == fusedclip.available_backends()
        for name, value in found.items():
            print(f"{name!r}: {value!r}")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shown = " ".join(README.read_text(encoding="utf-8").split())
    entries = done.stdout.strip().splitlines()
    if "'cpu': True" not in entries:
        pytest.skip("the extension is not built here: the README shows a machine where it is")
    for entry in entries:
        if entry.startswith("'cuda': "):
            # its reason depends on how torch and the extension were built; the README lists the variants
            assert entry != "'cuda': True"
            continue
        assert entry in shown, f"README's available_backends() output lacks {entry}"


def quick_start_commands(text: str) -> list[str]:
    """The commands of the first fenced block under the ``## Quick start`` heading (none when
    anything but blank lines stands between the heading and the block)."""
    match = re.search(r"^## Quick start[ \t]*\n(?:[ \t]*\n)*```[a-z]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    if match is None:
        return []
    return [line for line in match.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_quick_start_holds_the_main_job_and_the_test_suite():
    """Two commands, in this order: install and run the benchmark; install and run the tests."""
    commands = quick_start_commands(README.read_text())
    assert commands == [
        'pip install -e ".[bench]" && python -m fusedclip.bench',
        'pip install -e ".[test]" && python -m pytest -q',
    ], commands
    # the check has teeth: a line of prose between the heading and the block hides it
    assert quick_start_commands("## Quick start\n\nRun these:\n\n```bash\npip install x\n```\n") == []


def test_no_code_block_comes_before_the_quick_start():
    """The Quick start block is the README's first fenced block, so whoever copies the first
    commands they see gets the two that matter (installing torch is one line of prose above)."""
    text = README.read_text()
    first_fence = text.index("```")
    assert first_fence > text.index("## Quick start"), text[max(0, first_fence - 200) : first_fence + 80]


def api_table_names(text: str) -> set[str]:
    """The names the README's public API table documents (the backticked ``name(`` in its first
    column, and names joined by ``/``)."""
    start = text.index("The whole public API")
    table = text[start : text.index("\n## ", start)]
    names: set[str] = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)\(", line.split(" | ")[0]))
    return names


def test_the_api_table_lists_every_public_name():
    """Everything ``fusedclip`` exports is in the README's API table, and nothing else is."""
    import fusedclip

    exported = {name for name in fusedclip.__all__ if not name.startswith("__")}
    documented = api_table_names(README.read_text(encoding="utf-8"))
    assert documented == exported, (sorted(exported - documented), sorted(documented - exported))
    # the check has teeth: a table without a row misses its name
    text = README.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `NormTracker("))
    assert "NormTracker" not in api_table_names(text.replace(row + "\n", ""))
