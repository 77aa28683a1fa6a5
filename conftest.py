"""Root conftest: loads the stage plugin (markers, options, the stage_report fixture, JSON reports)."""
pytest_plugins = ["validation.plugin"]
