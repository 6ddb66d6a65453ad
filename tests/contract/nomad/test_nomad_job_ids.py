"""Job IDs that hold ``/`` (periodic and dispatched children) in URL paths, percent-encoded.

Nomad's handlers read the decoded ``URL.Path`` and take everything between ``/v1/job/`` and a
known suffix as the job ID, so ``/v1/job/a%2Fb/allocations`` asks for the allocations of job
``a/b``. Read-only: runs against the sim and a real Nomad.
"""

from __future__ import annotations

from nomad_contract import NomadTarget

CHILD = "no-such-parent/dispatch-1700000000-0a1b2c3d"
ENCODED = CHILD.replace("/", "%2F")


def test_an_unknown_child_job_is_404_job_not_found(nomad_target: NomadTarget) -> None:
    resp = nomad_target.get(f"/v1/job/{ENCODED}")
    assert resp.status_code == 404, resp.text
    assert resp.text.strip() == "job not found"


def test_the_allocations_of_an_unknown_child_job_are_an_empty_list(nomad_target: NomadTarget) -> None:
    resp = nomad_target.get(f"/v1/job/{ENCODED}/allocations")
    assert resp.status_code == 200, resp.text
    assert resp.json() == []
    assert int(resp.headers["X-Nomad-Index"]) >= 1


def test_a_job_read_by_its_percent_encoded_id_is_that_job(nomad_target: NomadTarget) -> None:
    job_id, allocs = nomad_target.some_job_with_allocs()
    encoded = "".join(f"%{b:02X}" for b in job_id.encode())  # every byte encoded: still the same path
    resp = nomad_target.get(f"/v1/job/{encoded}/allocations")
    assert resp.status_code == 200, resp.text
    assert {a["ID"] for a in resp.json()} >= {a["ID"] for a in allocs}
    assert nomad_target.get(f"/v1/job/{encoded}").json()["ID"] == job_id
