"""groupdiff: Group Diffusion (arXiv 2512.10954) as a command-line tool."""

__version__ = "0.1.0"
