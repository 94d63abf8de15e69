"""schemathesis fuzzes every route in the server's own OpenAPI schema (valid and invalid bodies,
query strings and headers): no input may make it answer 5xx.

Generation must stay short for this to be quick: the server caps every request at 4 new tokens
(`ServerConfig.max_tokens`), and each operation gets a small number of examples per mode.
(The operations are driven with hypothesis directly: schemathesis' pytest plugin reads a private
attribute that pytest 9 no longer has.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

import zen_eco
from zen_eco.serve.app import serve_in_thread
from zen_eco.serve.state import ServerConfig, ServerState

EXAMPLES = 10  # per operation and generation mode


@pytest.fixture(scope="module")
def served(smollm2_gguf_path):
    zm = zen_eco.load(dtype="float32", device="cpu")
    state = ServerState(zm, ServerConfig("smollm2", port=0, max_tokens=4, max_queue=256))
    with serve_in_thread(state, log_level="critical") as base:
        yield schemathesis.openapi.from_url(base + "/openapi.json"), base


def _fuzz(operation, mode: GenerationMode, base: str) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    def run(case):
        response = case.call(base_url=base, timeout=120)
        assert response.status_code < 500, (f"{case.method} {case.formatted_path} body={case.body!r:.300}: "
                                            f"{response.status_code} {response.text[:300]}")

    run()


def test_no_input_makes_a_server_error(served):
    schema, base = served
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health"} <= labels
    for operation in operations:
        _fuzz(operation, GenerationMode.POSITIVE, base)
        try:
            _fuzz(operation, GenerationMode.NEGATIVE, base)
        except Unsatisfiable:  # nothing to get wrong (no parameters, no body)
            pass
