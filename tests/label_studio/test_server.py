"""The session's Label Studio server works as a person would check it (tests/label_studio/conftest.py).

`GET /api/tasks?project=ID` answers a dict in 1.23.2, not a list:
`{"total_annotations": N, "total_predictions": N, "total": N, "tasks": [...]}`; `total` counts the
tasks that pass the filters over all pages. NOTES.md has the rest of what was verified.
"""

from __future__ import annotations

import httpx

FACES = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="face"/></RectangleLabels></View>'
)


def _box(label: str = "face") -> list[dict]:
    value = {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0, "rectanglelabels": [label]}
    return [{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "value": value}]


def test_health_and_version_answer_on_loopback_with_the_version_check_off(label_studio):
    assert label_studio.url.startswith("http://127.0.0.1:")
    assert httpx.get(f"{label_studio.url}/health").json() == {"status": "UP"}
    version = httpx.get(f"{label_studio.url}/api/version/").json()  # /version/ is an HTML page
    assert version["release"] == "1.23.2"
    assert version["label-studio-os-package"]["latest_version_from_pypi"] is None  # never asked PyPI


def test_the_legacy_key_lists_projects_and_wrong_credentials_get_401(label_studio):
    url = f"{label_studio.url}/api/projects"
    r = httpx.get(url, headers={"Authorization": f"Token {label_studio.legacy_token}"})
    assert r.status_code == 200 and "results" in r.json()
    for header in ({"Authorization": "Token not-a-key"}, {"Authorization": "Bearer not.a.jwt"}, {}):
        assert httpx.get(url, headers=header).status_code == 401


def test_the_personal_token_trades_for_a_300_s_access_token(label_studio):
    url = label_studio.url
    r = httpx.post(f"{url}/api/token/refresh/", json={"refresh": label_studio.personal_token})
    assert r.status_code == 200
    access = r.json()["access"]
    r = httpx.get(f"{url}/api/projects", headers={"Authorization": f"Bearer {access}"})
    assert r.status_code == 200
    # the PAT is a refresh token: sent as a bearer it is refused
    r = httpx.get(f"{url}/api/projects", headers={"Authorization": f"Bearer {label_studio.personal_token}"})
    assert r.status_code == 401


def test_a_project_its_tasks_and_predictions_round_trip(label_studio):
    admin = label_studio.admin
    project = admin.create_project("server-check", FACES)
    try:
        ids = admin.import_tasks(project["id"], [{"image": f"http://127.0.0.1:9/{i}.png"} for i in range(3)])
        assert len(ids) == 3
        r = admin.http.get("/api/tasks", params={"project": project["id"]})
        body = r.json()
        assert isinstance(body, dict) and body["total"] == 3
        assert sorted(t["id"] for t in body["tasks"]) == sorted(ids)

        created = admin.import_predictions(
            project["id"],
            [
                {"task": ids[0], "result": _box(), "score": 0.9, "model_version": "m1"},
                {"task": ids[1], "result": _box("not-in-config"), "model_version": "m1"},  # dropped
            ],
        )
        assert created == 1
        assert [(p["task"], p["model_version"]) for p in admin.predictions(project["id"])] == [(ids[0], "m1")]
        tasks = {t["id"]: t for t in admin.list_tasks(project["id"])}
        assert tasks[ids[0]]["predictions"][0]["score"] == 0.9
        assert tasks[ids[1]]["predictions"] == []

        admin.delete_task(ids[2])
        assert len(admin.list_tasks(project["id"])) == 2
    finally:
        admin.delete_project(project["id"])
    assert admin.http.get(f"/api/projects/{project['id']}/").status_code == 404
