"""cp2image core: CellProfiler features -> synthesized single-cell images.

Importing this package does not import torch, so the CellProfiler module can read a model's spec
(and explain what is missing) even where torch is absent.
"""

__version__ = "0.1.0"
