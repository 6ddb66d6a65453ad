"""Key layout: seed paths byte for byte, reversible escaping, and the template building the same key."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from shepard_lib.config import LockScope
from shepard_lib.keyspace import (
    Keyspace,
    TaskRef,
    TaskScope,
    escape_segment,
    nomad_template_block,
    shepard_template,
    unescape_segment,
)

SEED_REF = TaskRef(node="web-03", job="web", group="app", task="server", alloc_index=3)

# Names that break naive escaping, plus arbitrary text.
TRICKY = [
    "",
    ".",
    "..",
    "...",
    "/",
    "//",
    ",",
    ",2C",
    ",2F",
    "%",
    "%2F",
    "%2e%2e",
    "a..b",
    "web.v2",
    "a/b",
    " x ",
]
names = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12), st.text(alphabet="./,%2CEFab ", max_size=8))
refs = st.builds(TaskRef, node=names, job=names, group=names, task=names, alloc_index=st.integers(0, 10_000))


# --- the seed's paths --------------------------------------------------------------------


def test_trigger_key_is_the_seed_path_byte_for_byte() -> None:
    assert Keyspace().trigger_key(SEED_REF) == "shepard/keys/web-03/web/app/server/3"


def test_ordinary_names_are_not_escaped() -> None:
    for name in ["web", "web.v2", "api-gw_1", "Web.Example.COM", "a.b.c", "x9"]:
        assert escape_segment(name) == name


def test_cluster_scope_lock_keys_have_no_node_segment() -> None:
    ks = Keyspace()
    scope = ks.scope(SEED_REF)
    assert scope == TaskScope(job="web", group="app", task="server")
    assert ks.task_lock_key(scope) == "shepard/locks/web/app/server/task_lock"
    assert ks.slot_prefix(scope) == "shepard/locks/web/app/server/restart_lock/"
    assert ks.slot_key(scope, 2) == "shepard/locks/web/app/server/restart_lock/2"


def test_node_scope_lock_keys_are_the_seed_paths() -> None:
    ks = Keyspace(lock_scope=LockScope.NODE)
    scope = ks.scope(SEED_REF)
    assert scope.node == "web-03"
    assert ks.task_lock_key(scope) == "shepard/locks/web-03/web/app/server/task_lock"
    assert ks.slot_key(scope, 0) == "shepard/locks/web-03/web/app/server/restart_lock/0"


def test_prefixes_and_node_key() -> None:
    ks = Keyspace(prefix="ops/shepard")
    assert ks.keys_prefix() == "ops/shepard/keys/"
    assert ks.keys_prefix("web-03") == "ops/shepard/keys/web-03/"
    assert ks.locks_prefix() == "ops/shepard/locks/"
    assert ks.node_key("web-03") == "ops/shepard/nodes/web-03"
    assert ks.nodes_prefix() == "ops/shepard/nodes/"
    assert ks.gc_leader_key() == "ops/shepard/gc/leader"
    assert ks.trigger_key(SEED_REF).startswith(ks.keys_prefix("web-03"))


@pytest.mark.parametrize(
    "key",
    [
        "shepard/nodes/",
        "shepard/nodes/a/b",
        "shepard/nodes/a%2Fb",
        "shepard/nodes/x,41",
        "other/nodes/web-03",
    ],
)
def test_parse_node_key_rejects_foreign_keys(key: str) -> None:
    with pytest.raises(ValueError, match="not"):
        Keyspace().parse_node_key(key)


def test_periodic_child_job_name_is_escaped_not_split() -> None:
    ref = TaskRef("n1", "backup/periodic-1700000000", "g", "t", 0)
    key = Keyspace().trigger_key(ref)
    assert key == "shepard/keys/n1/backup,2Fperiodic-1700000000/g/t/0"
    assert Keyspace().parse_trigger_key(key) == ref


@pytest.mark.parametrize(
    ("name", "segment"),
    [
        ("", ","),
        (".", ",2E"),
        ("..", ".,2E"),
        ("...", ".,2E."),
        ("a,b", "a,2Cb"),
        ("50%", "50,25"),
        ("a/b", "a,2Fb"),
    ],
)
def test_escape_of_unsafe_names(name: str, segment: str) -> None:
    assert escape_segment(name) == segment
    assert unescape_segment(segment) == name


# --- misuse is an error, not a wrong key ---------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/shepard", "shepard/", "a//b", "a/../b", ".", "sh%s", 'a"b', "a b"])
def test_bad_prefix_is_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match="segments of letters"):
        Keyspace(prefix=prefix)


def test_scope_must_match_the_lock_scope() -> None:
    with pytest.raises(ValueError, match="no node"):
        Keyspace(lock_scope=LockScope.NODE).task_lock_key(TaskScope("j", "g", "t"))
    with pytest.raises(ValueError, match="names a node"):
        Keyspace().slot_prefix(TaskScope("j", "g", "t", node="n"))


@pytest.mark.parametrize("index", [-1, True, 1.0])
def test_alloc_index_must_be_a_non_negative_integer(index: object) -> None:
    with pytest.raises(ValueError, match="alloc_index"):
        Keyspace().trigger_key(TaskRef("n", "j", "g", "t", index))  # type: ignore[arg-type]


def test_slot_number_must_be_a_non_negative_integer() -> None:
    with pytest.raises(ValueError, match="slot number"):
        Keyspace().slot_key(TaskScope("j", "g", "t"), -1)


@pytest.mark.parametrize(
    "key",
    [
        "other/keys/n/j/g/t/0",
        "shepard/keys/n/j/g/t",
        "shepard/keys/n/j/g/t/0/x",
        "shepard/keys/n/j/g/t/01",
        "shepard/keys/n/j/g/t/-1",
        "shepard/keys/n/j,41/g/t/0",  # non-canonical escape of "jA"
        "shepard/keys/n/x,2/g/t/0",
        "shepard/keys/n/../g/t/0",
    ],
)
def test_parse_trigger_key_rejects_foreign_keys(key: str) -> None:
    with pytest.raises(ValueError, match="not"):
        Keyspace().parse_trigger_key(key)


def test_parse_lock_key_reads_plans_and_slots() -> None:
    ks = Keyspace()
    assert ks.parse_lock_key("shepard/locks/web/app/server/task_lock") == (
        TaskScope("web", "app", "server"),
        "task_lock",
        None,
    )
    assert ks.parse_lock_key("shepard/locks/web/app/server/restart_lock/4") == (
        TaskScope("web", "app", "server"),
        "restart_lock",
        4,
    )
    node_ks = Keyspace(lock_scope=LockScope.NODE)
    assert node_ks.parse_lock_key("shepard/locks/web-03/web/app/server/restart_lock/0") == (
        TaskScope("web", "app", "server", node="web-03"),
        "restart_lock",
        0,
    )


@pytest.mark.parametrize(
    "key",
    [
        "shepard/locks/web/app/server/restart_lock/",
        "shepard/locks/web/app/server/restart_lock/x",
        "shepard/locks/web/app/task_lock",
        "shepard/locks/n/web/app/server/task_lock",  # node layout under cluster scope
        "shepard/locks/web/app/server/other",
        "shepard/keys/web/app/server/task_lock",
    ],
)
def test_parse_lock_key_rejects_foreign_keys(key: str) -> None:
    with pytest.raises(ValueError, match="not"):
        Keyspace().parse_lock_key(key)


# --- properties ----------------------------------------------------------------------------


@given(names)
def test_escape_round_trips(name: str) -> None:
    assert unescape_segment(escape_segment(name)) == name


@given(names, names)
def test_distinct_names_give_distinct_segments(a: str, b: str) -> None:
    assert (escape_segment(a) == escape_segment(b)) == (a == b)


@given(names)
def test_node_key_round_trips(name: str) -> None:
    ks = Keyspace()
    assert ks.parse_node_key(ks.node_key(name)) == name


@given(refs)
def test_trigger_key_round_trips(ref: TaskRef) -> None:
    ks = Keyspace()
    assert ks.parse_trigger_key(ks.trigger_key(ref)) == ref


@given(refs, st.booleans(), st.integers(0, 63))
def test_lock_keys_round_trip(ref: TaskRef, node_scope: bool, slot: int) -> None:
    ks = Keyspace(lock_scope=LockScope.NODE if node_scope else LockScope.CLUSTER)
    scope = ks.scope(ref)
    assert ks.parse_lock_key(ks.task_lock_key(scope)) == (scope, "task_lock", None)
    assert ks.parse_lock_key(ks.slot_key(scope, slot)) == (scope, "restart_lock", slot)


def consul_rejects(key: str) -> str | None:
    """Why Consul (1.21.6+ key validation, Go's ServeMux path cleaning) would refuse ``key``."""
    segments = key.removesuffix("/").split("/")  # a prefix for listing ends with one "/"
    if any(s in ("", ".", "..") for s in segments):
        return "ServeMux cleans '.', '..' and empty segments"
    if "../" in key or "..\\" in key or key.startswith("..") or key.endswith(".."):
        return "path traversal"
    if re.search(r"%2e%2e(%2f|%5c|/)|\.\.%2f|\.\.%5c|%252e%252e%252f", key, re.IGNORECASE):
        return "encoded path traversal"
    if key.startswith("/") or key != key.strip():
        return "leading slash, or leading or trailing whitespace"
    return None


@given(refs, st.booleans())
def test_every_key_passes_consul_key_validation(ref: TaskRef, node_scope: bool) -> None:
    ks = Keyspace(lock_scope=LockScope.NODE if node_scope else LockScope.CLUSTER)
    scope = ks.scope(ref)
    keys = [ks.trigger_key(ref), ks.task_lock_key(scope), ks.slot_key(scope, 0), ks.keys_prefix(ref.node)]
    if ref.node == ref.node.rstrip():  # documented residue: node_key ends with the node name
        keys.append(ks.node_key(ref.node))
    for key in keys:
        assert consul_rejects(key) is None, (key, consul_rejects(key))


# --- the template builds the same key inside Nomad ------------------------------------------

_TOKENS = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|\||[A-Za-z_][A-Za-z0-9_.]*)')


def render(template: str, env: Mapping[str, str], kv: Mapping[str, str]) -> tuple[str, list[str]]:
    """A tiny Go-template evaluator for the functions shepard.tpl may use.

    Independent of the keyspace code: it reads the template text as consul-template would
    (``keyOrDefault``, ``printf`` with ``%s``, ``env``, ``replaceAll`` as Go's
    ``strings.ReplaceAll``, pipes, string literals). Returns the output and the keys read.
    """
    keys_read: list[str] = []

    def key_or_default(key: str, default: str) -> str:
        keys_read.append(key)
        return kv.get(key, default)

    funcs: dict[str, Callable[..., str]] = {
        "keyOrDefault": key_or_default,
        "printf": lambda fmt, *args: fmt % args,
        "env": lambda name: env.get(name, ""),
        "replaceAll": lambda old, new, s: s.replace(old, new),
    }

    def pipeline(tokens: list[str]) -> str:
        value: str | None = None
        while True:
            args: list[str] = []
            func: str | None = None
            while tokens and tokens[0] not in ("|", ")"):
                tok = tokens.pop(0)
                if tok == "(":
                    args.append(pipeline(tokens))
                    assert tokens.pop(0) == ")"
                elif tok.startswith('"'):
                    args.append(json.loads(tok))
                elif func is None and not args:
                    func = tok
                else:
                    raise AssertionError(f"unexpected token {tok!r}")
            if value is not None:
                args.append(value)
            value = funcs[func](*args) if func is not None else args[0]
            if not tokens or tokens[0] != "|":
                return value
            tokens.pop(0)

    out: list[str] = []
    rest = template
    while "{{" in rest:
        text, _, rest = rest.partition("{{")
        action, _, rest = rest.partition("}}")
        out.append(text)
        tokens = _TOKENS.findall(action)
        assert "".join(tokens).replace(" ", "") == action.replace(" ", ""), f"unparsed: {action!r}"
        out.append(pipeline(tokens))
    out.append(rest)
    return "".join(out), keys_read


def nomad_env(ref: TaskRef, job_name: str | None = None) -> dict[str, str]:
    """The variables Nomad gives ``ref``'s task; the job's name differs from its ID unless given."""
    return {
        "node.unique.name": ref.node,
        "NOMAD_JOB_ID": ref.job,
        "NOMAD_JOB_NAME": f"name-of-{ref.job}" if job_name is None else job_name,
        "NOMAD_GROUP_NAME": ref.group,
        "NOMAD_TASK_NAME": ref.task,
        "NOMAD_ALLOC_INDEX": str(ref.alloc_index),
    }


def test_template_is_the_design_text_for_ordinary_names() -> None:
    text = shepard_template()
    assert text.startswith('{{ keyOrDefault (printf "shepard/keys/%s/%s/%s/%s/%s" (env "node.unique.name"')
    assert text.endswith(' "" }}\n')
    assert "NOMAD_NODE_NAME" not in text
    used = set(re.findall(r"\b([a-zA-Z]+) \"|\(([a-zA-Z]+) ", text))
    assert {name for pair in used for name in pair if name} <= {"keyOrDefault", "printf", "env", "replaceAll"}


def test_template_renders_the_trigger_value() -> None:
    ks = Keyspace()
    output, keys = render(shepard_template(), nomad_env(SEED_REF), {ks.trigger_key(SEED_REF): "restart-7"})
    assert keys == ["shepard/keys/web-03/web/app/server/3"]
    assert output == "restart-7\n"
    assert render(shepard_template(), nomad_env(SEED_REF), {})[0] == "\n"


@given(refs)
@example(TaskRef(".", ".", ".", ".", 1))  # adjacent whole-segment cases need the second pass
@example(TaskRef("", "", "", "", 1))
@example(TaskRef(".", "", ".", "", 1))
def test_template_reads_exactly_the_trigger_key(ref: TaskRef) -> None:
    _, keys = render(shepard_template("ops/shepard"), nomad_env(ref), {})
    assert keys == [Keyspace("ops/shepard").trigger_key(ref)]


def test_template_reads_the_job_id_not_the_job_name() -> None:
    """``job "web-prod" { name = "web" }``: Shepard writes by the ID, so the template must read it."""
    ref = TaskRef("n1", "web-prod", "app", "server", 0)
    _, keys = render(shepard_template(), nomad_env(ref, job_name="web"), {})
    assert keys == ["shepard/keys/n1/web-prod/app/server/0"]
    assert 'env "NOMAD_JOB_ID"' in shepard_template()
    assert "NOMAD_JOB_NAME" not in shepard_template()


@pytest.mark.parametrize(
    ("child", "segment"),
    [
        ("batch/dispatch-1712345678-0a1b2c3d", "batch,2Fdispatch-1712345678-0a1b2c3d"),
        ("batch/dispatch-1712345678-tenant-7-0a1b2c3d", "batch,2Fdispatch-1712345678-tenant-7-0a1b2c3d"),
        ("backup/periodic-1700000000", "backup,2Fperiodic-1700000000"),
    ],
)
def test_a_child_job_id_is_one_escaped_segment_in_every_key(child: str, segment: str) -> None:
    """A dispatched or periodic child (Name = ID = ``<parent>/...``): one segment, valid Consul keys."""
    ref = TaskRef("n1", child, "app", "server", 2)
    _, keys = render(shepard_template(), nomad_env(ref, job_name=child), {})
    assert keys == [f"shepard/keys/n1/{segment}/app/server/2"]
    for ks in (Keyspace(), Keyspace(lock_scope=LockScope.NODE)):
        scope = ks.scope(ref)
        node = "n1/" if ks.lock_scope is LockScope.NODE else ""
        assert ks.task_lock_key(scope) == f"shepard/locks/{node}{segment}/app/server/task_lock"
        assert ks.slot_key(scope, 1) == f"shepard/locks/{node}{segment}/app/server/restart_lock/1"
        assert ks.parse_lock_key(ks.slot_key(scope, 1)) == (scope, "restart_lock", 1)
        for key in (ks.trigger_key(ref), ks.task_lock_key(scope), ks.slot_key(scope, 1)):
            assert consul_rejects(key) is None, key
            # Consul 1.21.5's strict key validation, the narrowest any release had
            assert re.fullmatch(r"[a-zA-Z0-9,_./?&=-]+", key), key
    assert Keyspace().parse_trigger_key(Keyspace().trigger_key(ref)) == ref


def test_nomad_template_block_renders_shepard_tpl_with_restart() -> None:
    block = nomad_template_block("ops/shepard")
    assert block.startswith("template {\n  data        = <<EOT\n")
    assert shepard_template("ops/shepard") + "EOT\n" in block
    assert '  destination = "local/shepard.tpl"\n' in block
    assert '  change_mode = "restart"\n' in block
    assert block.endswith("}\n")
    # HCL2 would interpolate ${ and %{ inside a heredoc.
    assert "${" not in block
    assert "%{" not in block
