"""Every patch of, or workaround for, another library's internals, in one place.

Each module names the versions it was written and tested against, applies its patch only
where the library still has the shape the patch expects, and has a test
(``tests/test_compat.py``) that fails when a new version makes the patch unnecessary or wrong.
"""
