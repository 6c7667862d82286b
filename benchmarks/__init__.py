"""fastvae's benchmark suite (a package so that its conftest does not shadow tests/conftest.py
when pytest collects tests/ and benchmarks/ in one run)."""
