"""scaleclr: scale-out SimCLR (Chen et al. 2020, arXiv 2002.05709) for wide ResNets.

Importing scaleclr never imports deepspeed, triton or apex.
"""

__version__ = "0.1.0"
