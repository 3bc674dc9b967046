"""The scale benchmark (``benchmarks/scale.py``), one module per section.

- ``params``: every knob of a run (``Params``), the API key and the prompt;
- ``measure``: what the sections share to measure (``Window``, ``LogTally``,
  ``in_parallel``, alternating rounds, the child processes of memory and lag);
- ``figures``: a goal and a figure as data (``Goal``, ``Figure``), and ``Section``;
- ``cpu``, ``requests``, ``utilisation``, ``memory``, ``lag``, ``submit``: each
  section's run, its docstring, its goals and the figures it gives.

``scale.py`` runs the sections, renders every figure into the JSON and is the
command line (``--quick``, ``--only``, ``--set``).
"""
