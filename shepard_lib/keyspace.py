"""Shepard's Consul key layout: the one place that knows key paths.

Layout (``shepard`` is ``key_prefix``)::

    shepard/keys/<node>/<job>/<group>/<task>/<alloc_index>     restart trigger (the seed's path)
    shepard/locks/<job>/<group>/<task>/task_lock               plan of the current rollout
    shepard/locks/<job>/<group>/<task>/restart_lock/<i>        restart slot i
    shepard/nodes/<node>                                       agent heartbeat
    shepard/gc/leader                                          lock of the cluster-wide GC pass

With ``lock_scope: node`` the lock paths carry the node first: ``shepard/locks/<node>/<job>/...``.

Which job name
--------------
The ``<job>`` segment is the job's **ID** everywhere: the coordinator keys triggers, plans and
slots by ``Allocation.JobID``, and the template reads ``env "NOMAD_JOB_ID"``. A job's ``name``
may differ from its ID (``job "web-prod" { name = "web" }``, or a job registered through the API),
and only the ID is unique in a namespace, so ``NOMAD_JOB_NAME`` would read a key Shepard never
writes. ``NOMAD_JOB_ID`` is a runtime variable since Nomad 1.0. A periodic or dispatched child has
its own ID (its name equals it), so each child is its own rollout with its own triggers and locks.

Escaping
--------
Path segments are Nomad names, and the trigger key is also built *inside Nomad* by the
``shepard.tpl`` template, which can only chain ``replaceAll`` over ``env`` values. So the escaping
must be a fixed chain of plain substring replacements, and it leaves ordinary names (letters,
digits, ``-``, ``_``, ``.`` inside a name) byte for byte unchanged. The escape character is ``,``:

1. ``,``  -> ``,2C``   (the escape character itself, first)
2. ``%``  -> ``,25``   (so no key contains a URL-encoded sequence such as ``%2e%2e%2f``)
3. ``/``  -> ``,2F``   (the key separator)
4. ``..`` -> ``.,2E``  (no key contains ``..``; ``...`` becomes ``.,2E.``)
5. a segment that is exactly ``.`` becomes ``,2E``, an empty segment becomes ``,``.

Rule 5 depends on the whole segment, which ``replaceAll`` cannot see in one value; the template
applies it on the joined key instead (``/./`` -> ``/,2E/`` and ``//`` -> ``/,/``, each twice,
because Go's ``strings.ReplaceAll`` does not see overlapping matches). Every ``,`` in an escaped
segment starts a three-character token, so unescaping is unambiguous and the mapping is
reversible: ``unescape_segment(escape_segment(x)) == x`` and distinct names stay distinct.
:func:`unescape_segment` accepts only canonical encodings, so a key parses back to exactly one
name.

Why these rules and this escape character (verified against the sources):

* Nomad forbids little: job IDs may not contain spaces (``Job.Validate``); periodic and
  dispatched children get the IDs ``<parent>/periodic-<unix>`` and
  ``<parent>/dispatch-<unix>-<id>`` (and ``derived.Name = derived.ID``), so ``/`` in job IDs is
  routine. Group names only need to be non-empty; task
  names may not contain ``/`` or ``\\`` (``Task.Validate``: they are directories); node names
  default to the hostname and are not restricted. ``.``, ``..``, spaces and non-ASCII are all
  possible in principle, so nothing but ``/`` can be assumed absent.
* Consul's HTTP API is served by Go's ``net/http`` ``ServeMux``, which redirects any path with
  ``.`` or ``..`` elements or repeated slashes to its cleaned form: a key with a ``.``, ``..`` or
  empty segment cannot be read or written by path (rule 5, and rule 4 for ``..``).
* Consul 1.21.5 added key validation (CVE-2025-11392). That release allowed only
  ``[a-zA-Z0-9,_./?&=-]``; 1.21.6 / 1.22 relaxed it to rejecting ``../`` and ``..\\``, encoded
  traversal such as ``..%2f`` and ``%2e%2e/``, keys that start or end with ``..`` and leading or
  trailing spaces (``disable_kv_key_validation`` turns it off). ``%XX`` escaping is therefore
  unusable (``%`` was rejected outright, and ``%2E%2E/`` is an "encoded traversal"), while ``,``
  passes every version. Rules 2 and 4 keep ``%`` and ``..`` out of every key, so no traversal
  check, plain or encoded, can match.

Other characters (spaces, non-ASCII, punctuation) pass through unchanged: no ``replaceAll`` chain
can enumerate them, they are valid keys in every Consul release except 1.21.5, and they never
split a key. Known residue: :meth:`Keyspace.node_key` ends with the node name, so Consul's
validation rejects it for a node name with a trailing space (and interim validation code on
Consul's main branch in September 2025, which also rejected keys ending in ``.com``, ``.sh``,
``.json`` and other file extensions, for such node names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shepard_lib.config import LockScope

# Per-value replacements, in order; the template chains exactly these (see shepard_template).
_SEGMENT_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    (",", ",2C"),
    ("%", ",25"),
    ("/", ",2F"),
    ("..", ".,2E"),
)
# Whole-segment cases, applied by the template on the joined key (each twice, see above).
_DOT_SEGMENT = ",2E"
_EMPTY_SEGMENT = ","
_KEY_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("/./", f"/{_DOT_SEGMENT}/"),
    ("/./", f"/{_DOT_SEGMENT}/"),
    ("//", f"/{_EMPTY_SEGMENT}/"),
    ("//", f"/{_EMPTY_SEGMENT}/"),
)
_TOKEN = re.compile(r",(2C|25|2F|2E)")
_UNESCAPES = {"2C": ",", "25": "%", "2F": "/", "2E": "."}
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
_INDEX = re.compile(r"0|[1-9][0-9]*")

TASK_LOCK = "task_lock"
RESTART_LOCK = "restart_lock"
GC_LEADER = "gc/leader"

TEMPLATE_DESTINATION = "local/shepard.tpl"
_TEMPLATE_ENV = ("node.unique.name", "NOMAD_JOB_ID", "NOMAD_GROUP_NAME", "NOMAD_TASK_NAME")


def escape_segment(name: str) -> str:
    """Escape a Nomad name into one Consul key segment (see the module docstring)."""
    escaped = name
    for old, new in _SEGMENT_REPLACEMENTS:
        escaped = escaped.replace(old, new)
    if escaped == "":
        return _EMPTY_SEGMENT
    if escaped == ".":
        return _DOT_SEGMENT
    return escaped


def unescape_segment(seg: str) -> str:
    """Invert :func:`escape_segment`; ValueError unless ``seg`` is a canonical escaped segment."""
    if seg == _EMPTY_SEGMENT:
        return ""
    name = _TOKEN.sub(lambda m: _UNESCAPES[m.group(1)], seg)
    if escape_segment(name) != seg:
        raise ValueError(f"not an escaped Shepard key segment: {seg!r}")
    return name


def check_prefix(prefix: str) -> None:
    """Raise ValueError unless ``prefix`` is a usable key prefix.

    A prefix is one or more segments of ``A-Z a-z 0-9 _ . -`` joined by ``/``, none of them ``.``
    or ``..``: it is written verbatim into keys and into the template's ``printf`` format.
    """
    segments = prefix.split("/")
    if not all(_PREFIX_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
        raise ValueError(
            "expected segments of letters, digits, '_', '.' and '-' joined by '/' "
            f"(no leading, trailing or double '/', no '.' or '..' segment), got {prefix!r}"
        )


@dataclass(frozen=True)
class TaskRef:
    """One allocation's task: the unit a restart trigger addresses.

    ``job`` is the job's ID (``Allocation.JobID``, the template's ``NOMAD_JOB_ID``), never its name.
    """

    node: str
    job: str
    group: str
    task: str
    alloc_index: int


@dataclass(frozen=True)
class TaskScope:
    """What a rollout coordinates: a task of a job's group (and its node with lock_scope=node).

    ``job`` is the job's ID, as in :class:`TaskRef`.
    """

    job: str
    group: str
    task: str
    node: str | None = None


class Keyspace:
    """Builds and parses Shepard's Consul keys for one ``key_prefix`` and ``lock_scope``."""

    def __init__(self, prefix: str = "shepard", lock_scope: LockScope = LockScope.CLUSTER) -> None:
        check_prefix(prefix)
        self.prefix = prefix
        self.lock_scope = LockScope(lock_scope)

    def trigger_key(self, ref: TaskRef) -> str:
        """``<prefix>/keys/<node>/<job>/<group>/<task>/<alloc_index>``: the value shepard.tpl reads."""
        if isinstance(ref.alloc_index, bool) or not isinstance(ref.alloc_index, int) or ref.alloc_index < 0:
            raise ValueError(f"alloc_index must be an integer >= 0, got {ref.alloc_index!r}")
        names = (ref.node, ref.job, ref.group, ref.task)
        return self.keys_prefix() + "/".join(escape_segment(n) for n in names) + f"/{ref.alloc_index}"

    def scope(self, ref: TaskRef) -> TaskScope:
        """The lock scope of ``ref``: its task, plus its node when ``lock_scope`` is ``node``."""
        node = ref.node if self.lock_scope is LockScope.NODE else None
        return TaskScope(job=ref.job, group=ref.group, task=ref.task, node=node)

    def task_lock_key(self, scope: TaskScope) -> str:
        """``<prefix>/locks/[<node>/]<job>/<group>/<task>/task_lock``: the rollout plan's key."""
        return self._scope_path(scope) + TASK_LOCK

    def slot_prefix(self, scope: TaskScope) -> str:
        """``.../restart_lock/``: the prefix under which the restart slots of ``scope`` live."""
        return self._scope_path(scope) + RESTART_LOCK + "/"

    def slot_key(self, scope: TaskScope, i: int) -> str:
        """``.../restart_lock/<i>``: restart slot ``i`` of ``scope``."""
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"slot number must be an integer >= 0, got {i!r}")
        return self.slot_prefix(scope) + str(i)

    def node_key(self, node: str) -> str:
        """``<prefix>/nodes/<node>``: the agent heartbeat of ``node``."""
        return self.nodes_prefix() + escape_segment(node)

    def gc_leader_key(self) -> str:
        """``<prefix>/gc/leader``: the lock held by the one agent running the cluster-wide GC pass."""
        return f"{self.prefix}/{GC_LEADER}"

    def nodes_prefix(self) -> str:
        """``<prefix>/nodes/``: every agent heartbeat."""
        return f"{self.prefix}/nodes/"

    def keys_prefix(self, node: str | None = None) -> str:
        """``<prefix>/keys/``, or ``<prefix>/keys/<node>/`` for one node's triggers."""
        if node is None:
            return f"{self.prefix}/keys/"
        return f"{self.prefix}/keys/{escape_segment(node)}/"

    def locks_prefix(self) -> str:
        """``<prefix>/locks/``: every plan and slot."""
        return f"{self.prefix}/locks/"

    def parse_trigger_key(self, key: str) -> TaskRef:
        """The TaskRef whose :meth:`trigger_key` is ``key``; ValueError for any other key."""
        rest = self._strip(key, self.keys_prefix())
        parts = rest.split("/")
        if len(parts) != 5 or not _INDEX.fullmatch(parts[4]):
            raise ValueError(f"not a Shepard trigger key: {key!r}")
        try:
            node, job, group, task = (unescape_segment(p) for p in parts[:4])
        except ValueError as exc:
            raise ValueError(f"not a Shepard trigger key: {key!r} ({exc})") from None
        return TaskRef(node=node, job=job, group=group, task=task, alloc_index=int(parts[4]))

    def parse_node_key(self, key: str) -> str:
        """The node name whose :meth:`node_key` is ``key``; ValueError for any other key."""
        rest = self._strip(key, self.nodes_prefix())
        try:
            if "/" in rest:
                raise ValueError("more than one segment")
            return unescape_segment(rest)
        except ValueError as exc:
            raise ValueError(f"not a Shepard node key: {key!r} ({exc})") from None

    def parse_lock_key(self, key: str) -> tuple[TaskScope, str, int | None]:
        """Parse a plan or slot key into ``(scope, "task_lock" | "restart_lock", slot)``.

        ``slot`` is None for a task_lock. ValueError for any key that :meth:`task_lock_key` or
        :meth:`slot_key` of this keyspace would not produce.
        """
        parts = self._strip(key, self.locks_prefix()).split("/")
        width = 4 if self.lock_scope is LockScope.NODE else 3
        slot: int | None = None
        if len(parts) == width + 1 and parts[width] == TASK_LOCK:
            kind = TASK_LOCK
        elif len(parts) == width + 2 and parts[width] == RESTART_LOCK and _INDEX.fullmatch(parts[width + 1]):
            kind, slot = RESTART_LOCK, int(parts[width + 1])
        else:
            raise ValueError(f"not a Shepard lock key: {key!r}")
        try:
            names = [unescape_segment(p) for p in parts[:width]]
        except ValueError as exc:
            raise ValueError(f"not a Shepard lock key: {key!r} ({exc})") from None
        node = names.pop(0) if self.lock_scope is LockScope.NODE else None
        job, group, task = names
        return TaskScope(job=job, group=group, task=task, node=node), kind, slot

    def _scope_path(self, scope: TaskScope) -> str:
        names = [scope.job, scope.group, scope.task]
        if self.lock_scope is LockScope.NODE:
            if scope.node is None:
                raise ValueError(f"lock_scope is node but the scope has no node: {scope!r}")
            names.insert(0, scope.node)
        elif scope.node is not None:
            raise ValueError(f"lock_scope is cluster but the scope names a node: {scope!r}")
        return self.locks_prefix() + "".join(escape_segment(n) + "/" for n in names)

    @staticmethod
    def _strip(key: str, prefix: str) -> str:
        if not key.startswith(prefix):
            raise ValueError(f"not under {prefix!r}: {key!r}")
        return key[len(prefix) :]


def _replace_all(old: str, new: str) -> str:
    return f'replaceAll "{old}" "{new}"'


def shepard_template(prefix: str = "shepard") -> str:
    """The text of ``local/shepard.tpl`` (docs/design.md section 2) with the escaping chain.

    It reads the task's trigger key; a new value there re-renders the file and, with
    ``change_mode = "restart"``, restarts the task. It uses only ``keyOrDefault``, ``printf``,
    ``env`` and ``replaceAll``, and renders exactly :meth:`Keyspace.trigger_key`.
    """
    check_prefix(prefix)
    segment_chain = " | ".join(_replace_all(old, new) for old, new in _SEGMENT_REPLACEMENTS)
    names = " ".join(f'(env "{var}" | {segment_chain})' for var in _TEMPLATE_ENV)
    key_chain = " | ".join(_replace_all(old, new) for old, new in _KEY_REPLACEMENTS)
    fmt = f"{prefix}/keys/%s/%s/%s/%s/%s"
    return f'{{{{ keyOrDefault (printf "{fmt}" {names} (env "NOMAD_ALLOC_INDEX") | {key_chain}) "" }}}}\n'


def nomad_template_block(prefix: str = "shepard") -> str:
    """An HCL ``template`` block that renders :func:`shepard_template` into ``local/shepard.tpl``."""
    return (
        "template {\n"
        "  data        = <<EOT\n"
        f"{shepard_template(prefix)}"
        "EOT\n"
        f'  destination = "{TEMPLATE_DESTINATION}"\n'
        '  change_mode = "restart"\n'
        "}\n"
    )
