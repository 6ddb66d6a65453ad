"""Scenario files: the nodes, jobs, timing and initial Consul keys of a simulated cluster.

A scenario is YAML (or the equivalent dict)::

    seed: 42
    nodes: [n1, n2, n3]          # or a count: 3 (node-1..node-3)
    jobs:
      - name: web
        # id: web-prod           # the job ID (`job "web-prod" { name = "web" }`); defaults to name
        meta: {shepard_concurrency: "2"}
        groups:
          - name: app
            count: 9             # placed round-robin over the nodes
            tasks:
              - name: server
                shepard: true    # local/shepard.tpl from the trigger key, change_mode restart
                templates:
                  - {key: config/web, destination: local/app.conf, change_mode: noop}
                service: web
                unhealthy_if: {key: config/web, equals: broken}
    timing:
      restart: 1s                # fixed, or {lognormal: {median: 1s, sigma: 0.5}}
      healthy_after: 0.5s
      register_after: 100ms      # running in Nomad until the service is in Consul
    keys: {config/web: "v1"}

A job with ``parameterized: {meta_required: [...], meta_optional: [...], payload: optional}`` is a
parameterized batch job: it places no allocation, and each dispatch (``POST /v1/job/<id>/dispatch``)
registers a child job ``<id>/dispatch-<unix>-<8 hex>`` whose name is its ID, as Nomad does.

:func:`load_scenario` validates it and raises :class:`ScenarioError` with one message per problem,
each naming the key path (``jobs[0].groups[0].count: ...``).
"""

from __future__ import annotations

import difflib
import math
import posixpath
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import voluptuous as vol

from shepard_lib import config
from shepard_lib.errors import ConfigError
from shepard_lib.yamlfile import read_yaml_mapping

__all__ = [
    "Condition",
    "Distribution",
    "GroupSpec",
    "JobSpec",
    "LogSpec",
    "NodeSpec",
    "Parameterized",
    "RestartPolicy",
    "Scenario",
    "ScenarioError",
    "TaskSpec",
    "TemplateSpec",
    "Timing",
    "load_scenario",
    "parse_duration",
    "small_scenario",
    "web_scenario",
]

CHANGE_MODES = ("restart", "noop", "signal")


class ScenarioError(ConfigError):
    """The scenario is invalid; ``problems`` has one message per problem with its key path."""


parse_duration = config.parse_duration
"""Scenario durations follow the configuration's rules: Go durations (``"1.5s"``, ``"2m"``) or ``0``."""


@dataclass(frozen=True)
class Distribution:
    """A duration in cluster seconds: fixed (``sigma == 0``) or log-normal around ``median``."""

    median: float
    sigma: float = 0.0

    def sample(self, rng: random.Random) -> float:
        """One draw, from ``rng`` so seeded runs repeat."""
        if self.sigma == 0 or self.median == 0:
            return self.median
        return self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0))


@dataclass(frozen=True)
class Condition:
    """A Consul key equal to a value (``unhealthy_if`` / ``crash_if``)."""

    key: str
    equals: str


@dataclass(frozen=True)
class TemplateSpec:
    """A task ``template`` block: ``data`` is the embedded template text."""

    destination: str
    data: str
    change_mode: str = "noop"
    change_signal: str = ""
    splay: float = 0.0


@dataclass(frozen=True)
class TaskSpec:
    """A task; ``shepard`` adds the shepard.tpl template (the restart trigger)."""

    name: str
    driver: str = "docker"
    shepard: bool = False
    templates: tuple[TemplateSpec, ...] = ()
    service: str | None = None
    unhealthy_if: Condition | None = None
    crash_if: Condition | None = None
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupSpec:
    """A task group with ``count`` allocations."""

    name: str
    count: int
    tasks: tuple[TaskSpec, ...]
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Parameterized:
    """A job's ``parameterized`` block: what a dispatch must and may pass."""

    payload: str = "optional"  # "optional" | "required" | "forbidden"
    meta_required: tuple[str, ...] = ()
    meta_optional: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobSpec:
    """A job: a service job, or a parameterized batch job (``parameterized``) and its dispatched children.

    ``id`` is the job ID (``job "<id>" { name = "<name>" }``); empty means the ID is ``name``, as
    when a jobspec sets no ``name``. A dispatched child has ``parent_id`` set.
    """

    name: str
    groups: tuple[GroupSpec, ...]
    namespace: str = "default"
    meta: Mapping[str, str] = field(default_factory=dict)
    id: str = ""
    parameterized: Parameterized | None = None
    parent_id: str = ""

    @property
    def job_id(self) -> str:
        """The job ID: ``id``, or ``name`` when no ID was given."""
        return self.id or self.name

    @property
    def batch(self) -> bool:
        """A batch job: parameterized jobs and their children are (Nomad allows nothing else)."""
        return self.parameterized is not None or bool(self.parent_id)


@dataclass(frozen=True)
class NodeSpec:
    """A client node; ``node_class`` and ``meta`` appear as ``node.class`` and ``meta.*`` in templates."""

    name: str
    datacenter: str = "dc1"
    node_class: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Timing:
    """How long things take, in cluster seconds."""

    restart: Distribution = Distribution(1.0)
    healthy_after: Distribution = Distribution(0.5)
    crash_after: Distribution = Distribution(0.5)
    register_after: Distribution = Distribution(0.1)
    """From a task's start (``running`` in Nomad) until its service and checks are in Consul."""


@dataclass(frozen=True)
class RestartPolicy:
    """The group ``restart`` block for crashing tasks (mode ``fail``)."""

    attempts: int = 2
    delay: float = 1.0
    interval: float = 1800.0


@dataclass(frozen=True)
class LogSpec:
    """Task log files: rotate at ``max_file_size`` bytes, keep ``max_files`` per stream."""

    max_file_size: int = 10 * 1024 * 1024
    max_files: int = 10
    lines_per_start: int = 3


@dataclass(frozen=True)
class Scenario:
    """A validated scenario."""

    nodes: tuple[NodeSpec, ...]
    jobs: tuple[JobSpec, ...]
    seed: int = 0
    timing: Timing = Timing()
    restart_policy: RestartPolicy = RestartPolicy()
    logs: LogSpec = LogSpec()
    keys: Mapping[str, str] = field(default_factory=dict)
    region: str = "global"
    key_prefix: str = "shepard"


# --- validation -------------------------------------------------------------------------------


def _duration(value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise vol.Invalid(str(exc)) from None


def _distribution(value: Any) -> Distribution:
    if isinstance(value, Mapping):
        inner = value.get("lognormal")
        if set(value) != {"lognormal"} or not isinstance(inner, Mapping):
            raise vol.Invalid("expected a duration or {lognormal: {median: <duration>, sigma: <number>}}")
        unknown = set(inner) - {"median", "sigma"}
        if unknown or "median" not in inner:
            raise vol.Invalid("lognormal needs exactly 'median' (a duration) and optional 'sigma'")
        sigma = inner.get("sigma", 0.5)
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 <= sigma < math.inf:
            raise vol.Invalid(f"sigma must be a finite number >= 0, got {sigma!r}")
        return Distribution(_duration(inner["median"]), float(sigma))
    return Distribution(_duration(value))


_NAME = vol.All(str, vol.Length(min=1), vol.Match(r"^[^\s]+$", msg="must be a non-empty name without spaces"))
_STR_MAP = vol.Schema({str: vol.Coerce(str)})
_CONDITION = vol.Schema({vol.Required("key"): str, vol.Required("equals"): vol.Coerce(str)})
_TEMPLATE = vol.All(
    vol.Schema(
        {
            vol.Exclusive("key", "source"): str,
            vol.Exclusive("data", "source"): str,
            vol.Required("destination"): str,
            vol.Optional("change_mode", default="noop"): vol.In(CHANGE_MODES),
            vol.Optional("change_signal", default=""): str,
            vol.Optional("splay", default=0.0): _duration,
        }
    ),
    lambda t: t if ("key" in t or "data" in t) else _fail("a template needs 'key' or 'data'"),
)
_TASK = vol.Schema(
    {
        vol.Required("name"): _NAME,
        vol.Optional("driver", default="docker"): str,
        vol.Optional("shepard", default=False): bool,
        vol.Optional("templates", default=list): [_TEMPLATE],
        vol.Optional("service"): _NAME,
        vol.Optional("unhealthy_if"): _CONDITION,
        vol.Optional("crash_if"): _CONDITION,
        vol.Optional("meta", default=dict): _STR_MAP,
    }
)
_GROUP = vol.Schema(
    {
        vol.Required("name"): _NAME,
        vol.Optional("count", default=1): vol.All(int, vol.Range(min=0)),
        vol.Required("tasks"): vol.All([_TASK], vol.Length(min=1)),
        vol.Optional("meta", default=dict): _STR_MAP,
    }
)
_PAYLOADS = ("optional", "required", "forbidden")
_PARAMETERIZED = vol.Schema(
    {
        vol.Optional("payload", default="optional"): vol.In(_PAYLOADS),
        vol.Optional("meta_required", default=list): [str],
        vol.Optional("meta_optional", default=list): [str],
    }
)
_JOB = vol.Schema(
    {
        vol.Required("name"): _NAME,
        vol.Optional("id"): _NAME,
        vol.Optional("parameterized"): _PARAMETERIZED,
        vol.Optional("namespace", default="default"): _NAME,
        vol.Optional("meta", default=dict): _STR_MAP,
        vol.Required("groups"): vol.All([_GROUP], vol.Length(min=1)),
    }
)
_NODE = vol.Any(
    _NAME,
    vol.Schema(
        {
            vol.Required("name"): _NAME,
            vol.Optional("datacenter", default="dc1"): _NAME,
            vol.Optional("class", default=""): str,
            vol.Optional("meta", default=dict): _STR_MAP,
        }
    ),
)
_SCHEMA = vol.Schema(
    {
        vol.Optional("seed", default=0): int,
        vol.Required("nodes"): vol.Any(vol.All(int, vol.Range(min=1)), vol.All([_NODE], vol.Length(min=1))),
        vol.Optional("jobs", default=list): [_JOB],
        vol.Optional("timing", default=dict): {
            vol.Optional("restart"): _distribution,
            vol.Optional("healthy_after"): _distribution,
            vol.Optional("crash_after"): _distribution,
            vol.Optional("register_after"): _distribution,
        },
        vol.Optional("restart_policy", default=dict): {
            vol.Optional("attempts"): vol.All(int, vol.Range(min=0)),
            vol.Optional("delay"): _duration,
            vol.Optional("interval"): _duration,
        },
        vol.Optional("logs", default=dict): {
            vol.Optional("max_file_size"): vol.All(int, vol.Range(min=1)),
            vol.Optional("max_files"): vol.All(int, vol.Range(min=1)),
            vol.Optional("lines_per_start"): vol.All(int, vol.Range(min=0)),
        },
        vol.Optional("keys", default=dict): _STR_MAP,
        vol.Optional("region", default="global"): _NAME,
        vol.Optional("key_prefix", default="shepard"): _NAME,
    }
)


def _fail(message: str) -> Any:
    raise vol.Invalid(message)


def _path(path: list[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<scenario>"


def _mapping_keys(schema: Any, path: list[Any]) -> list[str]:
    """The keys ``schema`` allows in the mapping at ``path`` (list indices included)."""
    if isinstance(schema, vol.Schema):
        return _mapping_keys(schema.schema, path)
    if isinstance(schema, vol.All | vol.Any):
        for validator in schema.validators:
            keys = _mapping_keys(validator, path)
            if keys:
                return keys
        return []
    if isinstance(schema, list) and schema and path and isinstance(path[0], int):
        return _mapping_keys(schema[0], path[1:])
    if isinstance(schema, dict):
        names = {(k.schema if isinstance(k, vol.Marker) else k): v for k, v in schema.items()}
        if not path:
            return [name for name in names if isinstance(name, str)]
        if path[0] in names:
            return _mapping_keys(names[path[0]], path[1:])
    return []


def _problem(err: vol.Invalid) -> str:
    path = list(err.path)
    if err.error_message == "extra keys not allowed" and path:
        close = difflib.get_close_matches(str(path[-1]), _mapping_keys(_SCHEMA, path[:-1]), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{_path(path)}: unknown key{hint}"
    return f"{_path(path)}: {err.msg}"


def load_scenario(source: Mapping[str, Any] | str | Path) -> Scenario:
    """Validate a scenario given as a dict, a YAML file path, or :class:`Path`.

    Raises :class:`ScenarioError` listing every problem with its key path; for a file, every
    message starts with the file's path (``small.yaml: jobs[0].name: ...``), and reading it
    fails as the configuration's does (``small.yaml:3:1: YAML syntax error: ...``).
    """
    if isinstance(source, str | Path):
        raw = read_yaml_mapping(source, kind="scenario file", error=ScenarioError)
        prefix = f"{source}: "
    elif isinstance(source, Mapping):
        raw, prefix = dict(source), ""
    else:
        raise ScenarioError("<scenario>: expected a mapping with at least 'nodes'")
    try:
        data = _SCHEMA(raw)
    except vol.MultipleInvalid as exc:
        raise ScenarioError(sorted(prefix + _problem(e) for e in exc.errors)) from None
    scenario = _build(data)
    problems = _semantic_problems(scenario)
    if problems:
        raise ScenarioError([prefix + problem for problem in problems])
    return scenario


def _build(data: dict[str, Any]) -> Scenario:
    if isinstance(data["nodes"], int):
        nodes = tuple(NodeSpec(f"node-{i}") for i in range(1, data["nodes"] + 1))
    else:
        nodes = tuple(
            NodeSpec(n)
            if isinstance(n, str)
            else NodeSpec(n["name"], n["datacenter"], n["class"], dict(n["meta"]))
            for n in data["nodes"]
        )
    jobs = tuple(
        JobSpec(
            name=j["name"],
            id=j.get("id", ""),
            parameterized=_parameterized(j["parameterized"]) if "parameterized" in j else None,
            namespace=j["namespace"],
            meta=dict(j["meta"]),
            groups=tuple(
                GroupSpec(g["name"], g["count"], tuple(_task(t) for t in g["tasks"]), dict(g["meta"]))
                for g in j["groups"]
            ),
        )
        for j in data["jobs"]
    )
    return Scenario(
        nodes=nodes,
        jobs=jobs,
        seed=data["seed"],
        timing=Timing(**data["timing"]),
        restart_policy=RestartPolicy(**data["restart_policy"]),
        logs=LogSpec(**data["logs"]),
        keys=dict(data["keys"]),
        region=data["region"],
        key_prefix=data["key_prefix"],
    )


def _parameterized(p: dict[str, Any]) -> Parameterized:
    return Parameterized(p["payload"], tuple(p["meta_required"]), tuple(p["meta_optional"]))


def _task(t: dict[str, Any]) -> TaskSpec:
    templates = tuple(
        TemplateSpec(
            destination=tp["destination"],
            data=tp["data"] if "data" in tp else '{{ key "' + tp["key"] + '" }}',
            change_mode=tp["change_mode"],
            change_signal=tp["change_signal"],
            splay=tp["splay"],
        )
        for tp in t["templates"]
    )
    return TaskSpec(
        name=t["name"],
        driver=t["driver"],
        shepard=t["shepard"],
        templates=templates,
        service=t.get("service"),
        unhealthy_if=Condition(**t["unhealthy_if"]) if "unhealthy_if" in t else None,
        crash_if=Condition(**t["crash_if"]) if "crash_if" in t else None,
        meta=dict(t["meta"]),
    )


def _semantic_problems(scenario: Scenario) -> list[str]:
    problems: list[str] = []
    _duplicates(problems, "nodes", [n.name for n in scenario.nodes])
    _duplicates(problems, "jobs", [f"{j.namespace}/{j.job_id}" for j in scenario.jobs])
    for ji, job in enumerate(scenario.jobs):
        both = (
            sorted(set(job.parameterized.meta_required) & set(job.parameterized.meta_optional))
            if job.parameterized
            else []
        )
        if both:
            problems.append(
                f"jobs[{ji}].parameterized: meta keys both required and optional: {', '.join(both)}"
            )
        _duplicates(problems, f"jobs[{ji}].groups", [g.name for g in job.groups])
        for gi, group in enumerate(job.groups):
            where = f"jobs[{ji}].groups[{gi}]"
            _duplicates(problems, f"{where}.tasks", [t.name for t in group.tasks])
            for ti, task in enumerate(group.tasks):
                dests = [t.destination for t in task.templates]
                if task.shepard and "local/shepard.tpl" in dests:
                    problems.append(
                        f"{where}.tasks[{ti}].templates: local/shepard.tpl is rendered by 'shepard: true'"
                    )
                _duplicates(problems, f"{where}.tasks[{ti}].templates destination", dests)
                for tp_i, tp in enumerate(task.templates):
                    inside = posixpath.normpath(posixpath.join("alloc", task.name, tp.destination))
                    if posixpath.isabs(tp.destination) or not inside.startswith("alloc/"):
                        problems.append(
                            f"{where}.tasks[{ti}].templates[{tp_i}].destination: "
                            f"{tp.destination!r} must stay inside the allocation dir (like local/x.conf)"
                        )
                    if tp.change_mode == "signal" and not tp.change_signal:
                        problems.append(
                            f"{where}.tasks[{ti}].templates[{tp_i}].change_signal: "
                            "required with change_mode signal"
                        )
    return problems


def _duplicates(problems: list[str], where: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            problems.append(f"{where}: duplicate name {name!r}")
        seen.add(name)


def small_scenario() -> dict[str, object]:
    """The default scenario (``examples/scenarios/small.yaml``): 3 nodes, one 3-allocation job."""
    return web_scenario(count=3, nodes=["node-1", "node-2", "node-3"], seed=1)


def web_scenario(
    *,
    count: int,
    nodes: int | list[str],
    concurrency: int | None = None,
    seed: int = 1,
    restart: str | dict[str, Any] = "1s",
    healthy_after: str | dict[str, Any] = "500ms",
    unhealthy_if_broken: bool = True,
) -> dict[str, Any]:
    """The scenario dict most tests use: job ``web``, group ``app`` of ``count`` allocations over ``nodes``
    (a count, or names), task ``server`` managed by Shepard with service ``web`` and ``config/web`` rendered
    with ``change_mode = "noop"``; ``config/web: broken`` makes its check fail (``unhealthy_if_broken``).
    ``concurrency`` sets the job meta ``shepard_concurrency``; ``restart`` and ``healthy_after`` are durations
    or distributions.
    """
    task: dict[str, Any] = {
        "name": "server",
        "shepard": True,
        "templates": [{"key": "config/web", "destination": "local/app.conf", "change_mode": "noop"}],
        "service": "web",
    }
    if unhealthy_if_broken:
        task["unhealthy_if"] = {"key": "config/web", "equals": "broken"}
    job: dict[str, Any] = {"name": "web", "groups": [{"name": "app", "count": count, "tasks": [task]}]}
    if concurrency is not None:
        job["meta"] = {"shepard_concurrency": str(concurrency)}
    return {
        "seed": seed,
        "nodes": nodes,
        "jobs": [job],
        "timing": {"restart": restart, "healthy_after": healthy_after},
        "keys": {"config/web": "v1"},
    }
