"""``samv2 view``: a browser view on trame-slicer (the optional ``view`` extra).

Importing this package imports nothing heavy: trame, trame-slicer and slicer-core (MRML) are
imported by :mod:`samv2core.view.app` only, which the ``view`` sub-command loads when it runs.
"""
