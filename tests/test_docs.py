"""The documentation stays true to the data and stays navigable.

docs/results.md, the peers tables of docs/benchmarks.md and the README's headline table are rendered from
``benchmarks/results/**/*.json`` by ``benchmarks/report.py``, so checking that the rendering is
current also checks that every number in the headline table comes from the JSON.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), images included
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def test_rendered_results_match_the_json():
    """docs/results.md, docs/benchmarks.md's peers tables and the README's headline are what report.py renders now."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_headline_table_is_rendered_and_names_the_machine():
    text = README.read_text()
    headline = text[text.index("<!-- headline:begin -->"):text.index("<!-- headline:end -->")]
    rows = [line for line in headline.splitlines() if line.startswith("| ") and "×" in line]
    assert rows, "the README's headline table has no rows"
    assert re.search(r"Measured on .+, AVX\S*, \d+ cores", headline), "the headline names no machine"


def test_readme_is_a_front_door_with_the_two_quick_start_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines"
    quick_start = "\n".join(lines[lines.index("## Quick start"):])
    block = quick_start[quick_start.index("```bash"):].split("```")[1]
    commands = [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_point_to_files_that_exist():
    broken = []
    for doc in [README, *DOCS]:
        for target in LINK.findall(FENCE.sub("", doc.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if not resolved.exists():
                broken.append(f"{doc.name}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_python_examples_run_as_written(capsys):
    """The README's Python examples, in order in one namespace, on the embedded model (the server's,
    which needs a running server, aside): they run, and do what the text around them says."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.DOTALL | re.MULTILINE)
    local = [block for block in blocks if "openai" not in block]
    assert len(local) == 3, "the README's generate, generate_batch and loglikelihood examples"
    namespace: dict = {}
    for block in local:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 -- the README's own code, run as a reader would
    printed = capsys.readouterr().out
    assert namespace["model"].prefix_cache.stats()["hit_tokens"] > 0  # the second question reused the first's prefix
    assert len(namespace["out"]) == 3 and all(r.num_cached_tokens > 0 for r in namespace["out"].values())
    assert re.search(r"\[\((-?\d+\.\d+(e-?\d+)?), (True|False)\), \((-?\d+\.\d+(e-?\d+)?), (True|False)\)\]", printed)
