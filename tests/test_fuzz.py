"""Fuzz every operation in ``GET /api/v1/openapi.json`` with schemathesis: never a 500.

The operations are read from the served document, so a route added later is fuzzed without a
change here. Each operation gets schema-valid requests, schema-violating ones (negative mode) and,
where it has an ``image_id`` path parameter, valid requests about an image that exists. The lake is
built by :func:`jobs.pipeline.run_pipeline` with every step this build has, so routes over
features, indexes, clusters, tags and the grid see real data once those steps exist.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings as hsettings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from conftest import write_images  # noqa: E402
from jobs.pipeline import PipelineRequest, run_pipeline  # noqa: E402
from lake.settings import Settings  # noqa: E402

EXAMPLES = {GenerationMode.POSITIVE: 10, GenerationMode.NEGATIVE: 10}
EXAMPLES_WITH_REAL_ID = 4


@pytest.fixture(scope="module")
def fuzz_lake(tmp_path_factory):
    from lake.catalog import Lake

    root = tmp_path_factory.mktemp("fuzz")
    write_images(root / "imgs", 12)
    lake = Lake.at(root / "lake")
    run_pipeline(lake, Settings(lake=lake.root, runner="local", partition_files=6),
                 PipelineRequest(images=str(root / "imgs"), collection="fuzz"))
    return lake


@pytest.fixture
def lake(fuzz_lake):
    return fuzz_lake


def _check(case, response, seen: dict) -> None:
    seen[case.operation.label] = seen.get(case.operation.label, 0) + 1
    where = f"{case.method} {case.formatted_path} query={case.query!r} body={str(case.body)[:200]!r}"
    assert response.status_code < 500, f"{response.status_code} for {where}: {response.text[:500]}"
    if response.status_code >= 400 and response.headers.get("Content-Type", "").startswith("application/json"):
        body = response.json()
        assert body.get("ok") is False and body.get("status") == response.status_code and body.get("error"), \
            f"bad error shape for {where}: {body}"


def test_no_operation_answers_500_to_generated_requests(app, admin_token, lake):
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 8, "openapi.json lists fewer operations than the API has"
    from lake.commit import open_table

    image_id = open_table(lake, "images").to_pyarrow_table(columns=["image_id"]).column(0)[0].as_py()
    headers = {"Authorization": f"Bearer {admin_token}"}
    seen: dict[str, int] = {}
    runs = [(mode, n, None) for mode, n in EXAMPLES.items()]
    runs.append((GenerationMode.POSITIVE, EXAMPLES_WITH_REAL_ID, {"image_id": image_id}))
    for op in operations:
        names = {p.name for p in op.path_parameters}
        for mode, n, path_parameters in runs:
            if path_parameters and not set(path_parameters) <= names:
                continue
            strategy = op.as_strategy(mode, path_parameters=path_parameters)

            @hsettings(max_examples=n, deadline=None, database=None, derandomize=True,
                       phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def fuzz(case):
                _check(case, case.call(headers=headers), seen)

            try:
                fuzz()
            except Unsatisfiable:
                if mode is not GenerationMode.NEGATIVE:
                    raise  # nothing in this operation can be made invalid (no parameters, no body)
    assert set(seen) == {op.label for op in operations}, "some operations were never called"
