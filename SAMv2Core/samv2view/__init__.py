"""``samv2 view``: the browser view, a package beside the core (the optional ``view`` extra).

It imports :mod:`samv2core`; the core never imports it (``samv2 view`` reaches it through the
core command line's dispatch table, by name, when the sub-command runs). Importing this package
imports nothing heavy: trame, trame-slicer and slicer-core (MRML) are imported by
:mod:`samv2view.app` only, which the command loads when it serves.
"""
