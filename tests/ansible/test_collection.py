"""The shepard.nomad collection end to end: real ``ansible-playbook`` runs against a simulated cluster.

Each test starts a simulator, writes the playbook's variables (addresses, ACL tokens, a Shepard
configuration file running Shepard's clock as fast as the sim's) and runs a playbook from
``playbooks/`` with ``-vvv``, the way an operator would, on localhost with this interpreter (which
has Shepard). Every run's output is searched for the ACL tokens, which must never appear.

The rolling restart, check mode and status tests also run against a real Consul and Nomad (their
``real`` variant, marked ``real_cluster``) when ``CONSUL_HTTP_ADDR``, ``NOMAD_ADDR`` (with
``CONSUL_HTTP_TOKEN`` / ``NOMAD_TOKEN``, and the CLIs' TLS variables), ``SHEPARD_TEST_JOB`` (a job
whose tasks render ``local/shepard.tpl`` and may be restarted) and ``SHEPARD_TEST_PREFIX`` (the key
prefix its templates read, used by nothing else) are set; there restarts are counted from Nomad's
task states and events, and afterwards every key the playbooks wrote under the prefix is deleted,
except the job's trigger keys (deleting one would restart its task once more). The agent example
runs in ``test_agent_role.py``. The others are sim-only: they break the job's configuration or
change its Consul key through the simulator (a halted rollout, resume and abort, the restart
example), or follow a rollout by the simulator's record (``wait: false``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig, NomadConfig, load_config
from shepard_lib.keyspace import Keyspace, TaskScope, nomad_template_block, shepard_template
from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.pytest_plugin import SimClusterFactory

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
EXAMPLES = REPO / "ansible_collections" / "shepard" / "nomad" / "docs" / "examples"
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
SCENARIO = REPO / "examples" / "scenarios" / "web-9.yaml"
SCALE = 25.0
TOKEN = "ansible-acl-token-4b1d7e90c3"
REAL_SKIP = (
    "set CONSUL_HTTP_ADDR, NOMAD_ADDR (and CONSUL_HTTP_TOKEN / NOMAD_TOKEN), SHEPARD_TEST_JOB "
    "(a job whose tasks render local/shepard.tpl) and SHEPARD_TEST_PREFIX (the key prefix they read) "
    "to run against a real cluster"
)

pytestmark = pytest.mark.skipif(
    not ANSIBLE_PLAYBOOK.exists(),
    reason=f"ansible-core is not installed next to {sys.executable}: pip install -e '.[ansible]'",
)


@dataclass
class Target:
    """Where the playbooks connect, and the secrets that must not show in their output."""

    consul_addr: str
    nomad_addr: str
    job: str
    config_file: str
    tokens: list[str | None] = field(default_factory=lambda: [None, None])
    """The Consul and the Nomad ACL token."""
    sim: SimCluster | None = None
    consul_tls: dict[str, Any] = field(default_factory=dict)
    """The TLS settings of Consul's ConsulConfig (ca_file, cert_file, key_file, verify), if any."""
    nomad_settings: dict[str, Any] = field(default_factory=dict)
    """The same for Nomad, with its namespace and region if not the defaults."""

    def connection(self) -> dict[str, Any]:
        """The module_defaults of group/shepard.nomad.shepard."""
        consul_token, nomad_token = self.tokens
        options = {
            "config_file": self.config_file,
            "consul_address": self.consul_addr,
            "nomad_address": self.nomad_addr,
            "consul_token": consul_token,
            "nomad_token": nomad_token,
        }
        return {k: v for k, v in options.items() if v is not None}

    def kv_index(self) -> int:
        """Consul's X-Consul-Index of the whole KV store: it moves with any KV write."""
        headers = {"X-Consul-Token": self.tokens[0]} if self.tokens[0] else {}
        tls = _requests_tls(self.consul_tls)
        reply = requests.get(f"{self.consul_addr}/v1/kv/?recurse", headers=headers, timeout=30, **tls)
        assert reply.status_code in (200, 404), reply.text
        return int(reply.headers["X-Consul-Index"])


def _requests_tls(tls: dict[str, Any]) -> dict[str, Any]:
    """``requests`` arguments for the TLS settings (``_tls``) of a ConsulConfig or NomadConfig."""
    verify = False if tls.get("verify") is False else tls.get("ca_file") or True
    cert = (tls["cert_file"], tls["key_file"]) if tls.get("cert_file") else None
    return {"verify": verify, "cert": cert}


def _tls(config: ConsulConfig | NomadConfig) -> dict[str, Any]:
    """The TLS settings of ``config`` that are not the defaults."""
    settings = {"ca_file": config.ca_file, "cert_file": config.cert_file, "key_file": config.key_file}
    return {**{k: v for k, v in settings.items() if v}, **({} if config.verify else {"verify": False})}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHEPARD_CONFIG_PATH", raising=False)


def _config(path: Path) -> str:
    path.write_text(
        # Wide real-time margins at this scale (30 s is 1.2 real seconds): a loaded machine must not
        # expire a session or miss a health deadline.
        "session_ttl: 30s\nlock_delay: 2s\nmin_healthy_time: 2s\nhealthy_deadline: 30s\n"
        f"time_scale: {SCALE}\n",
        encoding="utf-8",
    )
    return str(path)


@pytest.fixture
def sim(sim_cluster_factory: SimClusterFactory) -> SimCluster:
    return sim_cluster_factory(str(SCENARIO), time_scale=SCALE, acl_token=TOKEN)


@pytest.fixture
def target(sim: SimCluster, tmp_path: Path, no_client_env: None) -> Target:
    config = _config(tmp_path / "shepard.yaml")
    return Target(sim.consul_addr, sim.nomad_addr, "web", config, [TOKEN, TOKEN], sim)


@pytest.fixture(params=["sim", pytest.param("real", marks=pytest.mark.real_cluster)])
def any_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """The simulator, or the real cluster the CLIs' environment variables name."""
    if request.param == "sim":
        yield request.getfixturevalue("target")  # it clears those variables: nothing may reach a cluster
        return
    env = os.environ
    names = ("CONSUL_HTTP_ADDR", "NOMAD_ADDR", "SHEPARD_TEST_JOB", "SHEPARD_TEST_PREFIX")
    if not all(env.get(name) for name in names):
        pytest.skip(REAL_SKIP)
    cfg = load_config(env=env)  # as the CLIs read them: CONSUL_HTTP_ADDR's host:port form means http
    prefix = env["SHEPARD_TEST_PREFIX"]
    consul_tls = _tls(cfg.consul)
    scope = {"namespace": cfg.nomad.namespace if cfg.nomad.namespace != "default" else None}
    scope["region"] = cfg.nomad.region
    nomad_settings = {**_tls(cfg.nomad), **{k: v for k, v in scope.items() if v}}
    # The job's templates read its trigger keys under SHEPARD_TEST_PREFIX: Shepard must write there.
    # Addresses and tokens are the modules' options; the rest of the CLIs' variables (TLS files,
    # Nomad's namespace and region) come with the configuration file.
    settings = {"key_prefix": prefix, "min_healthy_time": "2s", "healthy_deadline": "300s"}
    settings.update({k: v for k, v in (("consul", consul_tls), ("nomad", nomad_settings)) if v})
    config = tmp_path / "shepard.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    tokens = [cfg.consul.token, cfg.nomad.token]
    yield Target(
        cfg.consul.address,
        cfg.nomad.address,
        env["SHEPARD_TEST_JOB"],
        str(config),
        tokens,
        consul_tls=consul_tls,
        nomad_settings=nomad_settings,
    )
    _delete_all_but_trigger_keys(cfg.consul, prefix)


def _delete_all_but_trigger_keys(config: ConsulConfig, prefix: str) -> None:
    """Delete what the playbooks wrote under ``prefix`` (plans, slots), keeping the trigger keys
    (``<prefix>/keys/``): the job's templates read them, and deleting one restarts its task once more."""
    consul = ConsulBackend(config, Clock())
    try:
        keep = Keyspace(prefix).keys_prefix()
        for key in consul.keys(prefix + "/"):
            if not key.startswith(keep):
                consul.delete(key)
    finally:
        consul.close()


def run_playbook(
    playbook: Path,
    tmp_path: Path,
    extra: dict[str, Any],
    *,
    tokens: list[str | None] | None = None,
    check: bool = False,
    python: str = sys.executable,
    inventory: str = "localhost,",
) -> str:
    """Run ``playbook`` with ``-vvv`` on localhost; its output, in which no ACL token may appear."""
    extra_file = tmp_path / "vars.json"
    extra_file.write_text(json.dumps(extra), encoding="utf-8")
    extra_file.chmod(0o600)
    argv = [
        str(ANSIBLE_PLAYBOOK),
        "-vvv",
        "-i",
        inventory,
        "-c",
        "local",
        "-e",
        f"ansible_python_interpreter={python}",
        "-e",
        f"@{extra_file}",
        str(playbook),
    ] + (["--check"] if check else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "NOMAD_", "ANSIBLE_"))}
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(REPO),
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
    )
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ansible-playbook exited {proc.returncode}:\n{output[-6000:]}"
    for token in tokens or []:
        assert not token or token not in output, "an ACL token is in the -vvv output"
    return output


def play(
    target: Target | None,
    playbook: str,
    tmp_path: Path,
    *,
    check: bool = False,
    python: str = sys.executable,
    **variables: Any,
) -> dict[str, Any]:
    """Run ``playbooks/<playbook>.yml``; return the JSON result it saved."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / f"{playbook}.json").unlink(missing_ok=True)
    extra = {"out": str(out), **variables}
    if target is not None:
        extra = {"connection": target.connection(), "job": target.job, **extra}
    tokens = target.tokens if target else None
    output = run_playbook(
        PLAYBOOKS / f"{playbook}.yml", tmp_path, extra, tokens=tokens, check=check, python=python
    )
    if target is not None and any(target.tokens):  # the invocation was shown, with the tokens masked
        assert '"consul_token": "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"' in output
    result: dict[str, Any] = json.loads((out / f"{playbook}.json").read_text(encoding="utf-8"))
    return result


def test_rolling_restart_restarts_every_allocation_once_within_the_concurrency(
    any_target: Target, tmp_path: Path
) -> None:
    with _nomad(any_target) as nomad:
        before = {a.id: a for a in nomad.job_allocations(any_target.job) if a.running}
        since_ns = time.time_ns()
        result = play(any_target, "restart", tmp_path, concurrency=2)
        assert not result.get("failed"), result.get("msg")
        assert result["changed"] is True and result["ok"] is True
        allocs = {a["alloc_id"] for a in result["planned"]}
        assert allocs == set(before), f"planned {sorted(allocs)}, running were {sorted(before)}"
        assert {r["alloc_id"] for r in result["restarted_allocations"]} == allocs
        assert 1 <= result["peak_concurrency"] <= 2
        assert [p["status"] for p in result["plans"]] == ["complete"] * len(result["plans"])
        sim = any_target.sim
        if sim is not None:  # the simulator's own record of every restart
            assert len(allocs) == 9
            restarted = Counter(r.alloc_id for r in sim.restarts())
            assert restarted == Counter({alloc: 1 for alloc in allocs}), (
                "each allocation restarts exactly once"
            )
            assert sim.peak_concurrency("web") <= 2
            return
        intervals = []  # a real cluster: Nomad's restart counts and task events
        for alloc_id, alloc in before.items():
            for task, state in alloc.task_states.items():
                now = nomad.allocation(alloc_id).task_states[task]
                if now.restarts != state.restarts:
                    assert now.restarts == state.restarts + 1, f"{alloc_id}/{task} restarted more than once"
                    intervals += _restart_intervals(any_target, alloc_id, task, since_ns)
    assert len(intervals) >= len(allocs)
    assert _peak(intervals) <= 2, "more than 2 tasks restarting at once"


def test_check_mode_returns_the_plan_and_writes_nothing(any_target: Target, tmp_path: Path) -> None:
    before = any_target.kv_index()
    result = play(any_target, "restart", tmp_path, check=True)
    assert not result.get("failed"), result.get("msg")
    assert result["dry_run"] is True
    assert result["changed"] is bool(result["planned"])
    assert result["restarted_allocations"] == [] and result["plans"]
    assert any_target.kv_index() == before, "check mode wrote to Consul's KV store"
    if any_target.sim is not None:
        assert len(result["planned"]) == 9
        assert [p["order"] for p in result["planned"]] == list(range(9))
        assert result["plans"][0]["status"] == "absent"
        assert any_target.sim.restarts() == []


def test_restart_status_info_reads_the_plans_of_a_job(any_target: Target, tmp_path: Path) -> None:
    status = play(any_target, "control", tmp_path)["status"]
    assert status["changed"] is False and not status.get("failed"), status.get("msg")
    assert all(p["job"] == any_target.job and p["key"].endswith("/task_lock") for p in status["plans"])
    if any_target.sim is not None:
        assert status["plans"] == [], "no rollout has run on a fresh simulator"


def test_halted_rollout_fails_with_the_plan_failed_then_abort_and_resume_control_it(
    target: Target, tmp_path: Path
) -> None:
    sim = target.sim
    assert sim is not None
    sim.set_key("config/web", "broken")
    result = play(target, "restart", tmp_path, concurrency=1, max_failures=0)
    assert result["failed"] is True
    assert result["msg"].startswith("rollout halted: plan web/app/server is failed")
    assert result["plans"][0]["status"] == "failed"
    assert len(result["failed_allocations"]) == 1 and result["restarted_allocations"] == []
    assert len(sim.restarts()) == 1, "a halted rollout restarts nothing after the first failure"

    scope = {"group": "app", "task": "server"}
    status = play(target, "control", tmp_path, **scope)["status"]
    assert [p["plan"]["status"] for p in status["plans"]] == ["failed"]
    assert status["changed"] is False

    aborted = play(target, "control", tmp_path, state="aborted", reason="looking at it", **scope)
    assert aborted["control"]["changed"] is True
    key = status["plans"][0]["key"]
    assert aborted["control"]["diff"]["before"][key]["status"] == "failed"
    assert aborted["control"]["diff"]["after"][key] == {
        "status": "aborted",
        "halt_reason": "looking at it",
        "orphaned": False,
    }
    assert [p["plan"]["status"] for p in aborted["status"]["plans"]] == ["aborted"]
    again = play(target, "control", tmp_path, state="aborted", **scope)
    assert again["control"]["changed"] is False, "aborting an aborted plan changes nothing"

    index = target.kv_index()
    would = play(target, "control", tmp_path, check=True, state="resumed", **scope)
    assert would["control"]["changed"] is True
    assert would["control"]["diff"]["after"][key]["status"] == "planned"
    assert [p["plan"]["status"] for p in would["status"]["plans"]] == ["aborted"]
    assert target.kv_index() == index, "check mode wrote to Consul's KV store"

    sim.set_key("config/web", "v2")
    resumed = play(target, "control", tmp_path, state="resumed", **scope)
    assert not resumed["control"].get("failed"), resumed["control"].get("msg")
    assert resumed["control"]["changed"] is True
    assert resumed["control"]["rollout"]["ok"] is True
    assert [p["plan"]["status"] for p in resumed["status"]["plans"]] == ["complete"]
    assert Counter(Counter(r.alloc_id for r in sim.restarts()).values()) == Counter({1: 8, 2: 1}), (
        "the failed allocation restarts again; the other eight once"
    )
    again = play(target, "control", tmp_path, state="resumed", **scope)
    assert again["control"]["changed"] is False, "resuming a complete plan changes nothing"


def test_wait_false_returns_the_registered_plan_and_the_rollout_goes_on(
    target: Target, tmp_path: Path
) -> None:
    sim = target.sim
    assert sim is not None
    result = play(target, "restart", tmp_path, wait=False, concurrency=2)
    assert not result.get("failed"), result.get("msg")
    assert result["started"] is True and result["changed"] is True
    (plan,) = result["plans"]
    assert plan["plan"]["generation"] >= 1 and len(plan["plan"]["members"]) == 9
    key = Keyspace().task_lock_key(TaskScope("web", "app", "server"))
    _wait_for_plan_status(target, key, "complete", timeout=120)
    assert Counter(r.alloc_id for r in sim.restarts()) == Counter(
        {a["alloc_id"]: 1 for a in result["planned"]}
    )
    assert sim.peak_concurrency("web") <= 2


def test_a_wrong_token_fails_with_consuls_refusal_and_never_shows_the_token(
    target: Target, tmp_path: Path
) -> None:
    target.tokens = ["wrong-token-" + TOKEN[::-1], "wrong-nomad-" + TOKEN[::-1]]
    result = play(target, "restart", tmp_path)
    assert result["failed"] is True
    assert "403" in result["msg"] and "Traceback" not in result["msg"]


def test_template_info_returns_the_exact_template_and_block(tmp_path: Path) -> None:
    result = play(None, "template", tmp_path, prefix="acme/shepard")
    assert result["template"] == shepard_template("acme/shepard")
    assert result["template_block"] == nomad_template_block("acme/shepard")
    assert result["destination"] == "local/shepard.tpl"


def test_a_python_without_shepard_fails_with_missing_required_lib(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(bare)], check=True)
    result = play(None, "template", tmp_path, python=str(bare / "bin" / "python"))
    assert result["failed"] is True
    assert "Failed to import the required Python library (shepard)" in result["msg"]


def _base_python() -> str:
    """An interpreter outside this virtualenv (the one it was made from)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base) if base.exists() else shutil.which("python3") or sys.executable


def _wait_for_plan_status(target: Target, key: str, status: str, timeout: float) -> None:
    """Follow the plan with Consul blocking queries until its status is ``status``."""
    headers = {"X-Consul-Token": target.tokens[0] or ""}
    index, seen = 0, None
    session = requests.Session()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = session.get(
            f"{target.consul_addr}/v1/kv/{key}",
            params={"index": index, "wait": "30s"},
            headers=headers,
            timeout=60,
            **_requests_tls(target.consul_tls),
        )
        index = int(reply.headers["X-Consul-Index"])
        if reply.status_code == 200:
            seen = json.loads(base64.b64decode(reply.json()[0]["Value"]))["status"]
            if seen == status:
                return
    pytest.fail(f"plan {key} still {seen!r} after {timeout} s, expected {status!r}")


def test_example_restart_after_a_consul_key_change(target: Target, tmp_path: Path) -> None:
    sim = target.sim
    assert sim is not None
    extra = {
        "consul_address": target.consul_addr,
        "nomad_address": target.nomad_addr,
        "consul_token": TOKEN,
        "nomad_token": TOKEN,
        "shepard_config_file": target.config_file,
        "web_config_value": "v2",
    }
    output = run_playbook(EXAMPLES / "restart-after-consul-key.yml", tmp_path, extra, tokens=[TOKEN])
    assert sim.get_key("config/web") == "v2"
    assert "9 allocation(s) restarted" in output
    assert sorted(Counter(r.alloc_id for r in sim.restarts()).values()) == [1] * 9
    assert sim.peak_concurrency("web") <= 2


def test_example_jobspec_renders_the_exact_template_block(tmp_path: Path) -> None:
    hcl2 = pytest.importorskip(
        "hcl2", reason="python-hcl2 parses the rendered jobspec: pip install -e '.[test]'"
    )
    dest = tmp_path / "web.nomad.hcl"
    run_playbook(EXAMPLES / "render-jobspec.yml", tmp_path, {"jobspec_dest": str(dest)})
    job = hcl2.loads(dest.read_text(encoding="utf-8"))["job"][0]['"web"']
    task = job["group"][0]['"app"']["task"][0]['"server"']
    templates = {_unquote(t["destination"]): t for t in task["template"]}
    shepard_tpl = templates["local/shepard.tpl"]
    assert _unquote(shepard_tpl["change_mode"]) == "restart"
    heredoc = _unquote(shepard_tpl["data"])
    assert heredoc == f"<<EOT\n{shepard_template()}EOT", "the rendered heredoc is exactly shepard.tpl"
    assert _unquote(templates["local/app.conf"]["change_mode"]) == "noop"


def _unquote(value: str) -> str:
    """python-hcl2 (7+) keeps the quotes of string attributes and labels, and a heredoc's markers."""
    return value[1:-1] if value.startswith('"') and value.endswith('"') else value


@contextmanager
def _nomad(target: Target) -> Iterator[NomadBackend]:
    """Shepard's Nomad client for ``target``, to read allocations before and after a playbook."""
    token = target.tokens[1]
    clock = target.sim.clock if target.sim is not None else Clock()  # the sim says its scale: it must agree
    config = NomadConfig(address=target.nomad_addr, token=token, **target.nomad_settings)
    backend = NomadBackend(config, clock)
    try:
        yield backend
    finally:
        backend.close()


def _restart_intervals(target: Target, alloc_id: str, task: str, since_ns: int) -> list[tuple[int, int]]:
    """[restart signalled, started again] intervals of a task after ``since_ns``, from Nomad's task events."""
    headers = {"X-Nomad-Token": target.tokens[1]} if target.tokens[1] else {}
    url = f"{target.nomad_addr}/v1/allocation/{alloc_id}"
    params = {k: v for k, v in target.nomad_settings.items() if k in ("namespace", "region")}
    tls = _requests_tls(target.nomad_settings)
    body = requests.get(url, params=params, headers=headers, timeout=30, **tls).json()
    intervals, began = [], None
    for event in body["TaskStates"][task]["Events"]:
        if event["Time"] <= since_ns:
            continue
        if event["Type"] in ("Restart Signaled", "Restarting") and began is None:
            began = event["Time"]
        elif event["Type"] == "Started" and began is not None:
            intervals.append((began, event["Time"]))
            began = None
    return intervals


def _peak(intervals: list[tuple[int, int]]) -> int:
    """The most intervals open at one instant."""
    running = peak = 0
    for _, step in sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals]):
        running += step
        peak = max(peak, running)
    return peak


def test_gc_deletes_stale_keys_and_check_mode_only_reports_them(target: Target, tmp_path: Path) -> None:
    assert target.sim is not None
    stale = "shepard/keys/n1/gone-job/app/server/0"
    target.sim.set_key(stale, "x")
    before = target.kv_index()
    dry = play(target, "gc", tmp_path, check=True)["gc"]
    assert not dry.get("failed"), dry.get("msg")
    assert dry["changed"] is True and dry["report"]["dry_run"] is True
    assert [d["key"] for d in dry["report"]["deleted"]["job_gone"]] == [stale]
    assert target.kv_index() == before, "check mode wrote to Consul's KV store"
    done = play(target, "gc", tmp_path)["gc"]
    assert not done.get("failed"), done.get("msg")
    assert done["changed"] is True and done["report"]["deleted_by_rule"] == {"job_gone": 1}
    assert target.sim.get_key(stale) is None
    again = play(target, "gc", tmp_path)["gc"]
    assert again["changed"] is False and again["report"]["deleted_count"] == 0


def test_job_check_info_reports_a_ready_job_and_fails_on_an_unknown_one(
    target: Target, tmp_path: Path
) -> None:
    check = play(target, "gc", tmp_path)["check"]
    assert not check.get("failed"), check.get("msg")
    assert check["changed"] is False and check["ready"] is True and check["job"] == "web"
    assert [t["managed"] for t in check["tasks"]] == [True]
    missing = play(target, "gc", tmp_path, check_job="nosuchjob")["check"]
    assert missing["failed"] is True and "nosuchjob" in missing["msg"]
