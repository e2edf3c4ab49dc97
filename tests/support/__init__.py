"""Helpers shared by every test suite (tests/*/): one implementation each, imported as
``support.<module>`` (pytest puts ``tests/`` on ``sys.path`` for tests/conftest.py; scripts that
run suites' modules directly, such as the nemesis campaign, put it there themselves)."""
