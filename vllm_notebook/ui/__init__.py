"""What users see: tables, live output lines, rendering of results, status views, the prompt panel.

``tables``, ``display`` and ``render`` are leaves every layer may use; ``status``, ``cluster_view``
and ``panel`` sit on top of the engines. Nothing here is imported by ``%load_ext`` except what the
magics need; ipywidgets loads with the first panel.
"""
