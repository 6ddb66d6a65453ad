"""Scenario files: validation errors name the key path; durations; the shipped examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from shepard_lib import cli
from shepard_lib.sim import ScenarioError, load_scenario, parse_duration, small_scenario
from shepard_lib.sim.scenario import Distribution

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "scenarios"


def _problems(data: Any) -> list[str]:
    with pytest.raises(ScenarioError) as err:
        load_scenario(data)
    return err.value.problems


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("1.5s", 1.5), ("2m", 120.0), ("1h30m", 5400.0), ("250ms", 0.25), ("0", 0.0), (0, 0.0)],
)
def test_durations_parse_go_style(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["1 sec", "s", "", "-1s", "+1s", "1d", "1..5s", True, 3, 1.5, -1])
def test_bad_durations_are_rejected(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("yaml_value", "shown"), [("3", "'3'"), (".nan", "'nan'"), (".inf", "'inf'"), ("-.inf", "'-inf'")]
)
def test_scenario_durations_follow_the_config_rules(tmp_path: Path, yaml_value: str, shown: str) -> None:
    """A bare number is refused as in the configuration file, so NaN and infinity are too."""
    path = tmp_path / "s.yaml"
    lognormal = f"{{lognormal: {{median: {yaml_value}}}}}"
    path.write_text(f"nodes: 1\ntiming: {{restart: {yaml_value}, healthy_after: {lognormal}}}\n")
    assert _problems(path) == [
        f"{path}: timing.healthy_after: not a duration: {shown} (durations look like 15s, 2m, 1h30m)",
        f"{path}: timing.restart: not a duration: {shown} (durations look like 15s, 2m, 1h30m)",
    ]


@pytest.mark.parametrize("sigma", [".nan", ".inf", "-1"])
def test_lognormal_sigma_must_be_a_finite_number(tmp_path: Path, sigma: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"nodes: 1\ntiming: {{restart: {{lognormal: {{median: 1s, sigma: {sigma}}}}}}}\n")
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}: timing.restart: sigma must be a finite number >= 0")


def test_errors_name_the_key_path() -> None:
    problems = _problems(
        {
            "nodes": ["a"],
            "jobs": [
                {
                    "name": "web",
                    "groups": [
                        {
                            "name": "app",
                            "count": "nine",
                            "tasks": [
                                {"name": "t", "templates": [{"destination": "local/x", "change_mode": "x"}]}
                            ],
                        }
                    ],
                }
            ],
            "timing": {"restart": "soon"},
            "surprise": 1,
        }
    )
    joined = "\n".join(problems)
    assert "jobs[0].groups[0].count: expected int" in joined
    assert "jobs[0].groups[0].tasks[0].templates[0].change_mode" in joined
    assert "timing.restart: not a duration: 'soon' (durations look like 15s, 2m, 1h30m)" in joined
    assert "surprise: unknown key" in joined


def test_semantic_errors_are_reported_together() -> None:
    problems = _problems(
        {
            "nodes": ["a", "a"],
            "jobs": [
                {
                    "name": "web",
                    "groups": [
                        {
                            "name": "app",
                            "tasks": [
                                {
                                    "name": "t",
                                    "shepard": True,
                                    "templates": [
                                        {"key": "k", "destination": "local/shepard.tpl"},
                                        {"key": "k", "destination": "local/x", "change_mode": "signal"},
                                    ],
                                }
                            ],
                        }
                    ],
                }
            ],
        }
    )
    assert "nodes: duplicate name 'a'" in problems
    assert any(p.startswith("jobs[0].groups[0].tasks[0].templates: local/shepard.tpl") for p in problems)
    assert any(p.startswith("jobs[0].groups[0].tasks[0].templates[1].change_signal") for p in problems)


def test_a_template_needs_a_key_or_data_and_not_both() -> None:
    assert _problems(
        {
            "nodes": 1,
            "jobs": [
                {
                    "name": "j",
                    "groups": [
                        {"name": "g", "tasks": [{"name": "t", "templates": [{"destination": "local/x"}]}]}
                    ],
                }
            ],
        }
    ) == ["jobs[0].groups[0].tasks[0].templates[0]: a template needs 'key' or 'data'"]
    both = _problems(
        {
            "nodes": 1,
            "jobs": [
                {
                    "name": "j",
                    "groups": [
                        {
                            "name": "g",
                            "tasks": [
                                {
                                    "name": "t",
                                    "templates": [{"destination": "local/x", "key": "k", "data": "d"}],
                                }
                            ],
                        }
                    ],
                }
            ],
        }
    )
    assert len(both) == 1 and both[0].startswith("jobs[0].groups[0].tasks[0].templates[0]")


def test_a_missing_file_is_a_scenario_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert _problems(missing) == [f"scenario file not found: {missing}"]
    assert _problems([1, 2]) == ["<scenario>: expected a mapping with at least 'nodes'"]


def test_unreadable_scenario_file_is_one_problem_naming_it(tmp_path: Path) -> None:
    assert _problems(tmp_path) == [f"cannot read scenario file {tmp_path}: Is a directory"]


def test_non_utf8_scenario_file_is_a_scenario_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("nodes: [caf\u00e9]\n".encode("latin-1"))
    assert _problems(path) == [f"{path}: not a UTF-8 text file"]


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("nodes: [a\n")
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}:2:1: YAML syntax error: "), problem
    assert "\n" not in problem and "<unicode string>" not in problem


@pytest.mark.parametrize(("text", "kind"), [("", "nodes: required key not provided"), ("- a\n", None)])
def test_empty_or_non_mapping_file_names_the_file(tmp_path: Path, text: str, kind: str | None) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    expected = (
        f"{path}: {kind}" if kind else f"{path}: expected a mapping of settings at the top level, got list"
    )
    assert _problems(path) == [expected]


def test_every_problem_of_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("nodes: [a, a]\njbos: []\nseed: x\n")
    assert _problems(path) == [
        f"{path}: jbos: unknown key (did you mean 'jobs'?)",
        f"{path}: seed: expected int",
    ]
    path.write_text("nodes: [a, a]\n")
    assert _problems(path) == [f"{path}: nodes: duplicate name 'a'"]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"nodes": 1, "jbos": []}, "jbos: unknown key (did you mean 'jobs'?)"),
        ({"nodes": 1, "frobnicate": 1}, "frobnicate: unknown key"),
        ({"nodes": 1, "timing": {"restrat": "1s"}}, "timing.restrat: unknown key (did you mean 'restart'?)"),
        ({"nodes": [{"name": "a", "clas": "x"}]}, "nodes[0].clas: unknown key (did you mean 'class'?)"),
        (
            {
                "nodes": 1,
                "jobs": [{"name": "j", "groups": [{"name": "g", "tasks": [{"name": "t", "sevice": "s"}]}]}],
            },
            "jobs[0].groups[0].tasks[0].sevice: unknown key (did you mean 'service'?)",
        ),
        (
            {
                "nodes": 1,
                "jobs": [
                    {
                        "name": "j",
                        "groups": [
                            {
                                "name": "g",
                                "tasks": [
                                    {
                                        "name": "t",
                                        "templates": [{"key": "k", "destination": "d", "splat": "1s"}],
                                    }
                                ],
                            }
                        ],
                    }
                ],
            },
            "jobs[0].groups[0].tasks[0].templates[0].splat: unknown key (did you mean 'splay'?)",
        ),
    ],
)
def test_unknown_keys_are_worded_like_the_config(data: dict[str, Any], problem: str) -> None:
    assert _problems(data) == [problem]


def test_sim_serve_with_a_bad_scenario_exits_2_with_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"nodes: 1\njbos: []\ntiming: {restart: 3}\n")
    assert cli.main(["sim", "serve", "--scenario", str(path), "--data-dir", str(tmp_path / "d")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: jbos: unknown key (did you mean 'jobs'?)",
        f"{path}: timing.restart: not a duration: '3' (durations look like 15s, 2m, 1h30m)",
    ]
    path.write_bytes(b"nodes: [caf\xe9]\n")
    assert cli.main(["sim", "serve", "--scenario", str(path), "--data-dir", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err == f"{path}: not a UTF-8 text file\n"


def test_node_count_names_nodes_and_lognormal_timing_parses() -> None:
    scenario = load_scenario(
        {"nodes": 3, "timing": {"restart": {"lognormal": {"median": "1s", "sigma": 0.5}}}}
    )
    assert [n.name for n in scenario.nodes] == ["node-1", "node-2", "node-3"]
    assert scenario.timing.restart == Distribution(1.0, 0.5)
    assert "timing.restart" in _problems({"nodes": 1, "timing": {"restart": {"lognormal": {"sigma": 1}}}})[0]


def test_key_templates_read_the_key_with_key() -> None:
    scenario = load_scenario(
        {
            "nodes": 1,
            "jobs": [
                {
                    "name": "j",
                    "groups": [
                        {
                            "name": "g",
                            "tasks": [
                                {"name": "t", "templates": [{"key": "config/x", "destination": "local/x"}]}
                            ],
                        }
                    ],
                }
            ],
        }
    )
    [tpl] = scenario.jobs[0].groups[0].tasks[0].templates
    assert (tpl.data, tpl.change_mode, tpl.splay) == ('{{ key "config/x" }}', "noop", 0.0)


@pytest.mark.parametrize("name", ["small.yaml", "web-9.yaml", "fleet-100.yaml"])
def test_shipped_scenarios_are_valid(name: str) -> None:
    scenario = load_scenario(EXAMPLES / name)
    assert scenario.nodes and scenario.jobs


def test_fleet_scenario_has_100_nodes() -> None:
    assert len(load_scenario(EXAMPLES / "fleet-100.yaml").nodes) == 100


def test_small_yaml_is_the_default_scenario() -> None:
    assert yaml.safe_load((EXAMPLES / "small.yaml").read_text()) == small_scenario()


@pytest.mark.parametrize("dest", ["/etc/passwd", "../../x", "../../../n2/alloc"])
def test_template_destinations_must_stay_in_the_allocation_dir(dest: str) -> None:
    task = {"name": "t", "templates": [{"key": "k", "destination": dest}]}
    problems = _problems({"nodes": 1, "jobs": [{"name": "j", "groups": [{"name": "g", "tasks": [task]}]}]})
    assert problems == [
        f"jobs[0].groups[0].tasks[0].templates[0].destination: {dest!r} must stay inside the allocation dir"
        " (like local/x.conf)"
    ]


def test_a_destination_in_the_shared_alloc_dir_is_allowed() -> None:
    task = {"name": "t", "templates": [{"key": "k", "destination": "../alloc/shared.conf"}]}
    load_scenario({"nodes": 1, "jobs": [{"name": "j", "groups": [{"name": "g", "tasks": [task]}]}]})


def test_the_format_example_in_the_scenarios_readme_is_valid() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    example = readme.split("```yaml", 1)[1].split("```", 1)[0]
    scenario = load_scenario(yaml.safe_load(example))
    assert scenario.jobs[0].groups[0].tasks[0].crash_if is not None
