"""The acceptance suite (run by harness.runner); a package so its modules import under unique
names (harness.suite.test_*) and never collide with a same-named test module of the pytest
session that calls the harness in-process."""
