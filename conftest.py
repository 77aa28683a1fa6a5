"""Root conftest: loads the stage plugin (markers, options, the stage_report fixture, JSON reports) and the
session-scoped vLLM server fixture shared by every stage that talks to a live engine."""
pytest_plugins = ["validation.plugin", "validation.conftest_vllm"]
