"""The remote board agent (``nasweb_agent.py``): a single self-contained file served to boards.

It must import nothing from ``engine`` (only torch and the standard library); tests check that its
layer construction matches ``engine.space.LayerSpec.build_module``.
"""
