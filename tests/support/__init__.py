"""Helpers for the tests: clients, services and load generators. The fixtures that
provide them are in ``tests/conftest.py``; test modules import helpers from here."""
