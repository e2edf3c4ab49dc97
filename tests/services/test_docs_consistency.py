"""README.md and docs/*.md cannot drift from the Makefile, .env.example and the compose files.

Static and fast (no Docker, no brokers): it reads the files only.

- every `make <target>` the docs name (in code: inline spans and fenced blocks) is a Makefile
  target (`make foo VAR=...` and `VAR=1 make foo` count as foo);
- every backticked setting (`NAME` or `NAME=value`, upper case) that compose/compose.yaml or
  compose/stack.yaml reads as `${NAME}`, or the Makefile reads as `$(NAME)`, is in .env.example
  (set or commented) or is a variable the Makefile sets or documents in a target's help;
- every relative link `[text](path)` resolves to an existing file, and a `#fragment` into a
  Markdown file to one of its headings;
- "N scenarios" agrees with docs/reliability.md's figures table;
- every `127.0.0.1:PORT` / `localhost:PORT` is a port compose.yaml publishes by default, and the
  one it names for the scaler's dashboard and API is SCALER_HTTP_PORT_HOST's default (Flower's and
  the standby scaler's by their own variables).

Each failure names the document, the line and what was expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAKEFILE = ROOT / "Makefile"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE = ROOT / "compose" / "compose.yaml"
STACK = ROOT / "compose" / "stack.yaml"
RELIABILITY = ROOT / "docs" / "reliability.md"

FENCE = re.compile(r"^(```|~~~)[^\n]*\n.*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MAKE_CALL = re.compile(r"(?<![\w./-])make((?:[ \t]+[^\s;&|`#)]+)+)")
SETTING = re.compile(r"\b([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|[A-Z]{2,})\b")
HOST_PORT = re.compile(r"\b(?:127\.0\.0\.1|localhost):(\d{2,5})\b")
PUBLISHED = re.compile(r"127\.0\.0\.1:\$\{([A-Z_][A-Z0-9_]*):-(\d+)\}:\d+")


@dataclass(frozen=True)
class Doc:
    path: Path
    text: str

    @property
    def name(self) -> str:
        return rel(self.path)

    def line_of(self, offset: int) -> int:
        return self.text.count("\n", 0, offset) + 1

    def where(self, offset: int) -> str:
        return f"{self.name}:{self.line_of(offset)}"


def rel(path: Path) -> str:
    """A path as the failure messages name it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_docs() -> list[Doc]:
    return [Doc(p, p.read_text()) for p in DOCS]


def masked(text: str, pattern: re.Pattern[str]) -> str:
    """The text with every match of pattern blanked out, newlines (and so line numbers) kept."""
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def code_fragments(doc: Doc) -> list[tuple[int, str]]:
    """(offset, text) of every fenced block and every inline code span outside them."""
    fragments = [(m.start(), m.group(0)) for m in FENCE.finditer(doc.text)]
    prose = masked(doc.text, FENCE)
    fragments += [(m.start(1), m.group(1)) for m in CODE_SPAN.finditer(prose)]
    return fragments


def makefile_targets() -> set[str]:
    text = MAKEFILE.read_text()
    return set(re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)[ \t]*:(?!=)", text, re.M))


def makefile_settings() -> set[str]:
    """Variables the Makefile sets (`X ?=`, `X :=`, `export X`) or documents as a knob of a target
    in its `## help` (`HA=1`, `QUEUE=...`, `(SERVICE=worker-io ...)`)."""
    text = MAKEFILE.read_text()
    names = set(re.findall(r"^(?:export[ \t]+)?([A-Z_][A-Z0-9_]*)[ \t]*[:?+!]?=", text, re.M))
    for line in re.findall(r"^export[ \t]+([A-Z0-9_ \t]+)$", text, re.M):
        names.update(line.split())
    for help_text in re.findall(r"^[A-Za-z0-9_.-]+:.*?##(.*)$", text, re.M):
        names.update(re.findall(r"\b([A-Z][A-Z0-9_]+)=", help_text))
    return names


def env_example_names() -> set[str]:
    return set(re.findall(r"^#?[ \t]*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))


def stack_settings() -> set[str]:
    """Names the compose files read from the environment (`${X}`, `${X:-d}`; not `$${X}`, which is
    the container's shell) and the Makefile reads (`$(X)`)."""
    names: set[str] = set()
    for path in (COMPOSE, STACK):
        names.update(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", path.read_text()))
    names.update(re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", MAKEFILE.read_text()))
    return names


def published_ports() -> dict[str, int]:
    """compose.yaml's host ports: variable -> its default."""
    return {name: int(port) for name, port in PUBLISHED.findall(COMPOSE.read_text())}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = masked(path.read_text(), FENCE)
    return {slug(h) for h in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", text, re.M)}


# --- the checks -----------------------------------------------------------------------------


def make_target_errors(docs: list[Doc], targets: set[str]) -> list[str]:
    errors = []
    for doc in docs:
        for offset, code in code_fragments(doc):
            for call in MAKE_CALL.finditer(code):
                words = [w.strip("'\"") for w in call.group(1).split()]
                words = [w for w in words if "=" not in w and not w.startswith("-")]
                if not words or not re.fullmatch(r"[a-z][a-z0-9_-]*", words[0]):
                    continue  # `make` alone, `make <target>` placeholders, `make $(X)`
                target = words[0]
                if target not in targets:
                    errors.append(
                        f"{doc.where(offset + call.start())}: `make {target}` names no Makefile "
                        f"target; expected one of: {', '.join(sorted(targets))}"
                    )
    return errors


ASSIGNMENT = re.compile(r"(?<![\w$])([A-Z][A-Z0-9_]*)=")
# Read by the compose files or the Makefile but no setting of this project's, so never expected in
# .env.example:
NOT_SETTINGS = {
    "MAKE",  # make's own: the make program, for recursive calls
    "MAKEFILE_LIST",  # make's own: the files it read (`make help` greps them)
    "COMPOSE_PROJECT_NAME",  # Compose's own: the project name (`-p`, or the file's `name:`)
    "SCALER_POLICY_SHA",  # computed by compose/scripts/swarm.sh from the policy file
}


def setting_errors(docs: list[Doc], settings: set[str], known: set[str]) -> list[str]:
    errors = []
    for doc in docs:
        for offset, code in code_fragments(doc):
            if "\n" in code.strip() and code.startswith(("```", "~~~")):
                continue  # fenced blocks hold commands and output, not settings
            whole = re.fullmatch(r"\s*\$?([A-Z][A-Z0-9_]*)(?:=\S*)?\s*", code)
            named = [(0, whole.group(1))] if whole else []
            # Assignments within a command: `make load QUEUE=... COUNT=...`, `HA=1 make up`.
            named += [(m.start(1), m.group(1)) for m in ASSIGNMENT.finditer(code)]
            for at, name in dict.fromkeys(named):
                if name in settings and name not in known and name not in NOT_SETTINGS:
                    errors.append(
                        f"{doc.where(offset + at)}: `{name}` is a setting compose/*.yaml or the "
                        "Makefile reads; expected it in .env.example (set or commented) or set "
                        "or documented (`make help`) by the Makefile"
                    )
    return errors


def link_errors(docs: list[Doc]) -> list[str]:
    errors = []
    for doc in docs:
        prose = masked(doc.text, FENCE)
        prose = masked(prose, re.compile(r"`[^`\n]+`"))
        for link in LINK.finditer(prose):
            target = link.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            path_part, _, fragment = target.partition("#")
            resolved = (doc.path.parent / path_part).resolve() if path_part else doc.path
            where = doc.where(link.start())
            if not resolved.exists():
                errors.append(
                    f"{where}: link ({target}) points to {rel(resolved)}, "
                    "which does not exist; expected a path relative to the document"
                )
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                errors.append(
                    f"{where}: link ({target}): {rel(resolved)} has no heading "
                    f"with anchor #{fragment}; expected one of: "
                    f"{', '.join(sorted(anchors(resolved)))}"
                )
    return errors


# Which published port a mention is about: a word for it near the mention, Flower's before the
# standby's before the scaler's (so "a standby scaler" is the standby).
PORT_OWNERS = (
    ("FLOWER_HOST_PORT", re.compile(r"flower|monitoring", re.I)),
    ("SCALER_STANDBY_HTTP_PORT_HOST", re.compile(r"standby", re.I)),
    ("SCALER_HTTP_PORT_HOST", re.compile(r"scaler|dashboard|/status|/metrics|/healthz", re.I)),
)


def port_owner(before: str, after: str, previous_line: str) -> str:
    """The variable a mention's port is said of. Looked for, in turn: the words before it on its
    line (since the last port or closing parenthesis); a path after it (`:9808/status`: the
    scaler's API and dashboard); the words after it up to the next port; the line before. With
    nothing said, the scaler's (the stack publishes only these three ports)."""
    before = re.split(r"\)", before)[-1]
    for context in (before, None, after, previous_line):
        if context is None:
            if after.startswith("/"):
                return "SCALER_HTTP_PORT_HOST"
            continue
        for name, word in PORT_OWNERS:
            if word.search(context):
                return name
    return "SCALER_HTTP_PORT_HOST"


def port_errors(docs: list[Doc], published: dict[str, int]) -> list[str]:
    errors = []
    by_port = {port: name for name, port in published.items()}
    for doc in docs:
        lines = doc.text.splitlines()
        for number, line in enumerate(lines, start=1):
            mentions = list(HOST_PORT.finditer(line))
            for i, mention in enumerate(mentions):
                port = int(mention.group(1))
                where = f"{doc.name}:{number}"
                if port not in by_port:
                    errors.append(
                        f"{where}: {mention.group(0)} is no port compose/compose.yaml publishes; "
                        f"expected one of {sorted(f'{p} ({n})' for n, p in published.items())}"
                    )
                    continue
                start = mentions[i - 1].end() if i else 0
                end = mentions[i + 1].start() if i + 1 < len(mentions) else len(line)
                owner = port_owner(
                    line[start : mention.start()],
                    line[mention.end() : end],
                    lines[number - 2] if number > 1 else "",
                )
                if published.get(owner) != port:
                    errors.append(
                        f"{where}: {mention.group(0)} is said of the {owner} port; expected "
                        f"{published.get(owner)}, its default in compose/compose.yaml"
                    )
    return errors


def reliability_scenarios() -> tuple[int, int]:
    """(rows, distinct scenarios) of docs/reliability.md's figures table (generated by the chaos
    run; a scenario run on Redis and on RabbitMQ is two rows)."""
    rows = re.findall(
        r"^\| ([^|]+?) \| [^|]+ \| (?:passed|failed|xfailed|skipped)", RELIABILITY.read_text(), re.M
    )
    return len(rows), len(set(rows))


def scenario_count_errors(docs: list[Doc]) -> list[str]:
    rows, scenarios = reliability_scenarios()
    errors = []
    for doc in docs:
        if doc.path == RELIABILITY:
            continue
        for m in re.finditer(r"\b(\d+) (?:chaos )?scenarios\b", doc.text):
            if int(m.group(1)) != scenarios:
                errors.append(
                    f'{doc.where(m.start())}: "{m.group(0)}"; expected {scenarios}, the '
                    f"scenarios of docs/reliability.md's figures ({rows} rows)"
                )
    return errors


# --- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return load_docs()


def test_every_named_make_target_exists(docs: list[Doc]) -> None:
    errors = make_target_errors(docs, makefile_targets())
    assert not errors, "\n".join(errors)


def test_every_documented_setting_is_in_env_example(docs: list[Doc]) -> None:
    errors = setting_errors(docs, stack_settings(), env_example_names() | makefile_settings())
    assert not errors, "\n".join(errors)


def test_every_relative_link_resolves(docs: list[Doc]) -> None:
    errors = link_errors(docs)
    assert not errors, "\n".join(errors)


def test_scaler_port_in_docs_is_the_published_default(docs: list[Doc]) -> None:
    published = published_ports()
    assert published.get("SCALER_HTTP_PORT_HOST"), "compose.yaml publishes no scaler port"
    errors = port_errors(docs, published)
    assert not errors, "\n".join(errors)


def test_chaos_scenario_counts_match_reliability(docs: list[Doc]) -> None:
    rows, scenarios = reliability_scenarios()
    assert rows and scenarios, "docs/reliability.md: no figures table found"
    errors = scenario_count_errors(docs)
    assert not errors, "\n".join(errors)


def test_env_example_has_the_published_defaults() -> None:
    """The defaults the docs are checked against are the ones .env.example ships."""
    example = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.M))
    for name, port in published_ports().items():
        assert example.get(name) == str(port), (
            f".env.example: {name}={example.get(name)!r}; expected {port}, "
            "compose/compose.yaml's default"
        )


# The checks themselves: each must find a planted inconsistency.


def test_checks_catch_planted_mismatches(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.md").write_text("# Real heading\n")
    bad = tmp_path / "docs" / "bad.md"
    bad.write_text(
        "# Bad\n\nRun `make no-such-target VAR=1` and `make up`.\n"
        "Set `REDIS_MEM_LIMIT` or `SOME_UNKNOWN_SETTING=1`, not `KNOWN`.\n"
        "See [gone](missing.md), [ok](real.md#real-heading), [off](real.md#nowhere), [me](#bad).\n"
        "The scaler's dashboard: http://127.0.0.1:9999/ and 127.0.0.1:5555 for the scaler.\n"
    )
    doc = Doc(bad, bad.read_text())
    where = f"{bad}:"
    make = make_target_errors([doc], {"up"})
    assert len(make) == 1 and f"{where}3" in make[0] and "no-such-target" in make[0], make
    read = {"REDIS_MEM_LIMIT", "SOME_UNKNOWN_SETTING", "KNOWN"}
    settings = setting_errors([doc], read, {"KNOWN"})
    assert len(settings) == 2 and all(f"{where}4" in e for e in settings), settings
    links = link_errors([doc])
    assert len(links) == 2 and all(f"{where}5" in e for e in links), links
    assert "missing.md" in links[0] and "#nowhere" in links[1], links
    ports = port_errors([doc], {"SCALER_HTTP_PORT_HOST": 9808, "FLOWER_HOST_PORT": 5555})
    assert len(ports) == 2 and all(f"{where}6" in e for e in ports), ports
    scenarios = scenario_count_errors([Doc(bad, "The chaos suite runs 999 scenarios.\n")])
    assert len(scenarios) == 1 and f"{where}1" in scenarios[0], scenarios
