"""Qt-free library of the SAMv2Slicer module: MRML <-> samv2core conversions (``nodes``), the
module logic (``logic``), background tasks (``worker``), dependency handling
(``dependencies``) and the sample data pair (``slicer_sample_data``).

Importable in plain Python with the ``slicer-core`` package; no Slicer application or Qt.
The core is a plain ``import samv2core``: the installed extension bundles it next to the
module (see the module's CMakeLists.txt); in a source checkout ``pip install -e .`` installs it.
"""
