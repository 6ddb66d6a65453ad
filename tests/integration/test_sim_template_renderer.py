"""The simulator's Go-template subset: what it renders, and what it refuses like a real template."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from shepard_lib.gotemplate import MissingKey, TemplateError, render
from shepard_lib.keyspace import Keyspace, TaskRef, shepard_template

KV = {"a": b"alpha", "config/web": b"v1", "empty": b""}


def _render(text: str, env: dict[str, str] | None = None) -> str:
    return render(text, env or {}, KV.get).text


def test_key_and_key_or_default() -> None:
    assert _render('x={{ key "a" }} y={{ keyOrDefault "missing" "dflt" }} z={{ keyOrDefault "a" "d" }}') == (
        "x=alpha y=dflt z=alpha"
    )
    assert _render('[{{ key "empty" }}]') == "[]"


def test_pipes_pass_the_value_as_last_argument() -> None:
    assert _render('{{ "a/b/c" | replaceAll "/" "-" | replaceAll "a" "A" }}') == "A-b-c"
    assert _render('{{ key (printf "%s/%s" "config" "web") }}') == "v1"
    assert _render('{{ printf "%s-%d-%q-%%" "x" 7 "y" }}') == 'x-7-"y"-%'


def test_env_reads_only_the_given_environment() -> None:
    assert (
        _render('{{ env "NOMAD_JOB_NAME" }}/{{ env "NOMAD_NODE_NAME" }}', {"NOMAD_JOB_NAME": "web"}) == "web/"
    )


def test_trim_markers_comments_and_raw_strings() -> None:
    assert _render("a  {{- `raw` -}}  b {{/* note */}}c") == "arawb c"


def test_keys_read_are_reported_as_dependencies() -> None:
    result = render('{{ key "a" }}{{ keyOrDefault "missing" "" }}', {}, KV.get)
    assert result.keys_read == frozenset({"a", "missing"})


def test_key_of_a_missing_key_blocks() -> None:
    with pytest.raises(MissingKey) as err:
        _render('{{ key "nope" }}')
    assert err.value.key == "nope"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{{ service "web" }}', 'function "service" not defined'),
        ("{{ .Values }}", "unexpected"),
        ('{{ key "a" "b" }}', "wrong number of args for key: want 1 got 2"),
        ('{{ "x" "y" }}', "can't give argument to non-function"),
        ('{{ key "a"', "unclosed action"),
        ('{{ (key "a" }}', "unclosed left paren"),
        ("{{ }}", "missing value for command"),
    ],
)
def test_anything_outside_the_subset_fails(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message.replace("(", r"\(")):
        _render(text)


_NAMES = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)


@given(node=_NAMES, job=_NAMES, group=_NAMES, task=_NAMES, index=st.integers(0, 500))
@example(node="n1", job="batch/dispatch-1712345678-0a1b2c3d", group="app", task="server", index=0)
def test_shepard_template_renders_exactly_the_trigger_key(
    node: str, job: str, group: str, task: str, index: int
) -> None:
    ref = TaskRef(node, job, group, task, index)
    key = Keyspace().trigger_key(ref)
    env = {
        "node.unique.name": node,
        "NOMAD_JOB_ID": job,
        "NOMAD_JOB_NAME": f"name-of-{job}",  # a job's name may differ from its ID: Shepard keys by ID
        "NOMAD_GROUP_NAME": group,
        "NOMAD_TASK_NAME": task,
        "NOMAD_ALLOC_INDEX": str(index),
    }
    result = render(shepard_template(), env, {key: b"fresh"}.get)
    assert result.text == "fresh\n"
    assert result.keys_read == frozenset({key})
