"""Qt-free library of the SAMv2Slicer module: MRML <-> samv2core conversions (``nodes``), the
module logic (``logic``), the controller the widget calls (``controller``), the operations table
(``ops``), the worker process and its client (``server``, ``worker``, ``protocol``), dependency
handling (``dependencies``) and the sample data pair (``slicer_sample_data``).

Importable in plain Python with the ``slicer-core`` package; no Slicer application or Qt, and
no torch on the GUI side (only ``steps`` and ``server`` use it, in the worker process). The core
is a plain ``import samv2core``: the installed extension bundles it next to the module (see the
module's CMakeLists.txt); in a source checkout ``corepath`` finds ``../SAMv2Core``.
"""
